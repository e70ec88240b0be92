"""A small client of TorchServe's management API: registered models, their workers, readiness."""
from __future__ import annotations

from flannel.handlers.keys import current_token
from flannel.handlers.ts_config import HTTP_TIMEOUT_S, ServerInfo



def model_readiness(info: ServerInfo, token: str) -> dict[str, int]:
    """READY workers per registered model, from the management API.

    Raises:
        requests.RequestException: the management API does not answer.
    """
    import requests

    headers = {"Authorization": f"Bearer {token}"}
    base = info.management_url.rstrip("/")
    listing = requests.get(f"{base}/models", headers=headers, timeout=HTTP_TIMEOUT_S)
    listing.raise_for_status()
    ready = {}
    for model in listing.json().get("models", []):
        name = model["modelName"]
        ready[name] = sum(w.get("status") == "READY" for v in describe_model(info, token, name)
                          for w in v.get("workers", []))
    return ready


def describe_model(info: ServerInfo, token: str, model: str) -> list[dict]:
    """The management API's description of ``model``, one dict per version (batchSize,
    maxBatchDelay, workers with their pid and status, ...).

    Raises:
        requests.RequestException: the management API does not answer or refuses.
    """
    import requests

    answer = requests.get(f"{info.management_url.rstrip('/')}/models/{model}",
                          headers={"Authorization": f"Bearer {token}"}, timeout=HTTP_TIMEOUT_S)
    answer.raise_for_status()
    return answer.json()


def worker_pids(info: ServerInfo, model: str) -> list[int]:
    """The process ids of ``model``'s workers, from the management API (its key from the key
    file, renewed when expired)."""
    desc = describe_model(info, current_token(info, "management"), model)
    return sorted(int(w["pid"]) for v in desc for w in v.get("workers", []) if w.get("pid"))

