"""What a served answer says beside its probabilities, fitted at export on the run's own splits:
calibration, the operating point, conformal prediction sets and the out-of-distribution score.

    flannel export onnx RUN_DIR --operating-point "COVID-19:sensitivity>=0.95" --coverage 0.9

Fitted on the eager module before it is traced, so the graph carries what belongs in it:
- **calibration** (``flannel.calibration``): temperature (or vector) scaling fitted by NLL on the
  validation split, set as the graph's ``LogitScaling`` buffers: every backend serves the
  calibrated probabilities and every gate compares them;
- **out-of-distribution score** (``flannel.ood``): each member's class means and shrunk shared
  covariance of its penultimate features on the training split, the threshold set on the
  validation split so that ``TARGET_PASS_RATE`` of it passes; the graph's ``ood_score`` is the
  distance over that threshold (at most 1 passes).

What the handler applies to the graph's calibrated probabilities goes to ``answer_policy.json``:
- **operating point** (``flannel.operating_point``): per-class thresholds chosen on validation
  for the stated targets; the decision rule, and the test figures with patient-level bootstrap
  95% intervals;
- **prediction sets** (``flannel.conformal``): split conformal sets for the stated coverage on
  validation, with the measured test coverage and mean set size.

The same file holds the figures that judge them (calibration error before and after, OOD AUROC
per set of images no training saw, ``flannel.ood_sets``), and ``answer_report.md`` with
``reliability.png`` and ``ood_scores.png`` shows them.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from flannel import calibration as C
from flannel.artifacts import ANSWER_POLICY, ARTIFACT_FILES, OOD_PASS_LIMIT
from flannel.conformal import fit_conformal, set_figures
from flannel.data.records import read_manifest, resolve_path
from flannel.metrics import classification_metrics
from flannel.ood import TARGET_PASS_RATE, fit_mahalanobis, threshold_for
from flannel.operating_point import (bootstrap_intervals, choose_operating_point, class_figures,
                                     parse_targets)
from flannel.preprocess import PreprocessSpec, load_tensor

log = logging.getLogger(__name__)

POLICY_FORMAT = 1
POLICY_FILE = ARTIFACT_FILES[ANSWER_POLICY]
REPORT_FILE = "answer_report.md"
# Environment variable naming the folder the generated OOD sets are kept in.
OOD_SETS_ENV = "FLANNEL_OOD_SETS"
# Prediction-set coverage when none is stated: 9 of 10 sets hold the true class.
DEFAULT_COVERAGE = 0.9
# Patient-level bootstrap replicates for the 95% intervals (percentile method).
BOOTSTRAP_REPLICATES = 2000
BATCH = 16


class AnswerPolicyError(RuntimeError):
    """The run has no split manifest or no training/validation images to fit on."""


@dataclass
class PolicyConfig:
    """What export fits; recorded in ``answer_policy.json``."""

    calibration: str = "temperature"   # "temperature", "vector" or "none"
    operating_point: list[str] = field(default_factory=list)  # e.g. ["COVID-19:sensitivity>=0.95"]
    coverage: float = DEFAULT_COVERAGE
    conformal_score: str = "lac"
    ood_pass_rate: float = TARGET_PASS_RATE
    ood_sets: bool = True               # measure the OOD score on the generated image sets
    seed: int = 0


@dataclass
class SplitOutputs:
    """The eager module's uncalibrated probabilities and each member's features on one split."""

    probabilities: np.ndarray
    features: list[np.ndarray]
    labels: np.ndarray
    patients: list[str]


@dataclass
class PolicyPlots:
    """What ``answer_report.md``'s figures draw: served OOD scores of in-distribution images and
    of each generated set, and per judged split (uncalibrated, calibrated, labels)."""

    in_scores: np.ndarray
    ood_sets: dict[str, np.ndarray]
    reliability: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]


@torch.no_grad()
def _outputs(module, paths: list[Path], spec: PreprocessSpec,
             desc: str) -> tuple[np.ndarray, list[np.ndarray]]:
    """Decode (inside the progress bar: on radiograph-sized files it is most of the work) and
    run ``module.parts`` batch by batch."""
    probs, feats = [], []
    for i in tqdm(range(0, len(paths), BATCH), desc=desc, unit="batch", leave=False):
        x = torch.stack([load_tensor(p, spec) for p in paths[i:i + BATCH]])
        p, f = module.parts(x)
        probs.append(p.double().numpy())
        feats.append([t.double().numpy() for t in f])
    members = len(feats[0]) if feats else 0
    return (np.concatenate(probs) if probs else np.zeros((0, 0)),
            [np.concatenate([b[m] for b in feats]) for m in range(members)])


def split_outputs(module, rows: list, manifest_path: Path, spec: PreprocessSpec,
                  class_names: list[str], split: str) -> SplitOutputs:
    paths = [resolve_path(r.path, manifest_path.parent) for r in rows]
    probs, feats = _outputs(module, paths, spec, f"answer policy ({split}, {len(rows)} images)")
    return SplitOutputs(probs, feats, np.array([class_names.index(r.label) for r in rows]),
                        [r.patient_id for r in rows])


@torch.no_grad()
def member_distances(module, features: list[np.ndarray]) -> np.ndarray:
    """(N,) mean over members of each one's Mahalanobis distance (the graph's own modules)."""
    per_member = [lg.ood(torch.from_numpy(f).float()).double().numpy()
                  for lg, f in zip(module.ood_members, features)]
    return np.mean(per_member, axis=0)


def fit_ood(module, train: SplitOutputs, val: SplitOutputs, pass_rate: float) -> dict:
    """Fit every member's distance on train, set the threshold on val; sets the buffers."""
    shrinkage = []
    for lg, feats in zip(module.ood_members, train.features):
        means, whitening, s = fit_mahalanobis(feats, train.labels, len(lg.ood.center))
        lg.ood.load_fit(means, whitening)
        shrinkage.append(s)
    val_distance = member_distances(module, val.features)
    threshold = max(threshold_for(val_distance, pass_rate), np.finfo(np.float32).tiny)
    module.ood_scale.fill_(1.0 / threshold)
    return {"method": "mahalanobis", "features": "penultimate layer, per member, mean distance",
            "covariance": "shared, Ledoit-Wolf shrinkage", "shrinkage": shrinkage,
            "threshold": threshold, "target_pass_rate": pass_rate,
            "val_pass_rate": float(np.mean(val_distance <= threshold)),
            "served": "ood_score = distance / threshold; above 1 is not like the training images",
            "in_graph": True}


def fit_calibration(module, val: SplitOutputs, splits: dict[str, SplitOutputs],
                    kind: str) -> tuple[dict, dict[str, np.ndarray]]:
    """Fit the scaling on val, set the graph's buffers; figures and calibrated probabilities."""
    logits = {name: C.logits_of(s.probabilities) for name, s in splits.items()}
    if kind == "none":
        scaling = C.Scaling("temperature")
        figures = {name: {"before": C.split_figures(s.probabilities, s.labels)}
                   for name, s in splits.items()}
    else:
        scaling, report = C.calibrate(C.logits_of(val.probabilities), val.labels,
                                      {n: (logits[n], s.labels) for n, s in splits.items()}, kind)
        figures = {n: report[n] for n in splits}
    module.calibration.load_scaling(scaling)
    calibrated = {n: scaling.probabilities(logits[n]) for n in splits}
    return ({"kind": kind, **scaling.to_dict(), "fitted_on": "val", "in_graph": True,
             "ece_bins": C.ECE_BINS, "figures": figures}, calibrated)


def decision_figures(labels: np.ndarray, decisions: np.ndarray, patients: list[str],
                     class_names: list[str], seed: int) -> dict:
    """Accuracy, macro-F1 and per-class sensitivity/specificity with bootstrap intervals."""
    metrics = classification_metrics(labels, decisions, class_names, normal_class=None)
    return {"images": int(len(labels)), "patients": len(set(patients)),
            "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
            "per_class": bootstrap_intervals(labels, decisions, np.asarray(patients), class_names,
                                             n_boot=BOOTSTRAP_REPLICATES, seed=seed),
            "bootstrap": {"replicates": BOOTSTRAP_REPLICATES, "level": 0.95, "unit": "patient"}}


def fit_operating_point(cfg: PolicyConfig, class_names: list[str], val_probs: np.ndarray,
                        val: SplitOutputs, test_probs: np.ndarray | None,
                        test: SplitOutputs | None) -> dict:
    targets = parse_targets(cfg.operating_point, class_names)
    point = choose_operating_point(val_probs, val.labels, class_names, targets)
    out = {**point.to_dict(), "val": class_figures(val.labels, point.decide(val_probs)[0],
                                                   class_names)}
    if test is not None:
        out["test"] = decision_figures(test.labels, point.decide(test_probs)[0], test.patients,
                                       class_names, cfg.seed)
    return out


def fit_sets(cfg: PolicyConfig, class_names: list[str], val_probs: np.ndarray, val: SplitOutputs,
             test_probs: np.ndarray | None, test: SplitOutputs | None) -> dict:
    conformal = fit_conformal(val_probs, val.labels, cfg.coverage, cfg.conformal_score)
    out = conformal.to_dict()
    if test is not None:
        out["test"] = set_figures(conformal.sets(test_probs), test.labels, class_names)
    return out


def ood_sets_folder() -> Path:
    """Where the generated OOD sets are kept between exports: ``$FLANNEL_OOD_SETS``, else
    ``~/.cache/flannel/ood_sets``."""
    folder = os.environ.get(OOD_SETS_ENV)
    return Path(folder) if folder else Path.home() / ".cache" / "flannel" / "ood_sets"


def ood_set_paths(folder: Path) -> dict[str, list[Path]]:
    """The OOD sets' images in ``folder``: those recorded there when every file is present and
    the packages they come from are the installed ones, else a fresh build."""
    from flannel.ood_sets import MANIFEST_NAME, OOD_SETS, build_ood_sets, package_versions

    recorded_path = folder / MANIFEST_NAME
    try:
        recorded = json.loads(recorded_path.read_text())
        paths = {name: [folder / name / f["file"] for f in entry["files"]]
                 for name, entry in recorded.get("sets", {}).items()}
        known = {*paths, *recorded.get("unavailable", {})}
        if (recorded.get("packages") == package_versions() and known == set(OOD_SETS)
                and all(p.is_file() for files in paths.values() for p in files)):
            return paths
    except FileNotFoundError:
        pass
    except Exception as exc:  # noqa: BLE001 - a cache that cannot be read is built again
        log.warning("the OOD sets recorded in %s cannot be read (%s: %s); building them again",
                    recorded_path, type(exc).__name__, exc)
    log.info("generating the out-of-distribution image sets in %s", folder)
    return build_ood_sets(folder)


def ood_evaluation(module, spec: PreprocessSpec,
                   in_scores: np.ndarray) -> tuple[dict, dict[str, np.ndarray]]:
    """The served score on each generated set of images no training saw (``flannel.ood_sets``)
    against the in-distribution (test) scores: AUROC and pass rate per set, and the scores."""
    from flannel.ood_sets import ood_figures

    sets = ood_set_paths(ood_sets_folder())
    scores = {}
    for name, paths in sets.items():
        tensors = [load_tensor(p, spec) for p in paths]
        with torch.no_grad():
            scores[name] = np.concatenate([
                module(torch.stack(tensors[i:i + BATCH]))[-1].double().numpy()
                for i in range(0, len(tensors), BATCH)])
    return ood_figures(in_scores, scores, OOD_PASS_LIMIT), scores


@torch.no_grad()
def served_scores(module, features: list[np.ndarray]) -> np.ndarray:
    return member_distances(module, features) * float(module.ood_scale)


def policy_summary(policy: dict) -> dict:
    """The manifest's ``answer_policy``: what the served probabilities and score are."""
    cal = policy["calibration"]
    return {"artifact": "answer_policy", "probabilities": (
                "uncalibrated" if cal["kind"] == "none" else
                f"calibrated: {cal['kind']} scaling fitted on val, inside the graph"),
            "temperature": cal.get("temperature"),
            "ood_score": policy["ood"]["served"],
            "operating_point": policy["operating_point"].get("thresholds"),
            "coverage": policy["conformal"]["coverage"]}


def fit_answer_policy(module, split_manifest: Path | None, spec: PreprocessSpec,
                      class_names: list[str],
                      cfg: PolicyConfig = PolicyConfig()) -> tuple[dict, "PolicyPlots"]:
    """Fit calibration and the OOD score into ``module``; the whole policy with its figures,
    and what its plots draw.

    Args:
        module: a ``LearnerGraph`` or ``FusedEnsemble`` in eval mode (its buffers are set).
        split_manifest: the run's split manifest (train, val and, for the figures, test).
        spec: the served input's host preprocessing.
        class_names: output order.
        cfg: what to fit.

    Raises:
        AnswerPolicyError: no split manifest, or no training or validation images.
    """
    if split_manifest is None:
        raise AnswerPolicyError("the run records no split manifest: calibration, the operating "
                                "point and the OOD score are fitted on its train and val splits")
    rows = {s: read_manifest(split_manifest, s) for s in ("train", "val", "test")}
    for s in ("train", "val"):
        if not rows[s]:
            raise AnswerPolicyError(f"{split_manifest} has no {s} images to fit the answer "
                                    "policy on")
    module.eval()
    out = {s: split_outputs(module, r, Path(split_manifest), spec, class_names, s)
           for s, r in rows.items() if r}
    val, test = out["val"], out.get("test")
    judged = {s: out[s] for s in ("val", "test") if s in out}
    calibration, calibrated = fit_calibration(module, val, judged, cfg.calibration)
    ood = fit_ood(module, out["train"], val, cfg.ood_pass_rate)
    test_probs = calibrated.get("test")
    policy = {"format": POLICY_FORMAT, "class_names": list(class_names),
              "fitted_on": {"split_manifest": str(split_manifest),
                            **{f"{s}_images": len(r) for s, r in rows.items()}},
              "config": {**cfg.__dict__},
              "calibration": calibration,
              "operating_point": fit_operating_point(cfg, class_names, calibrated["val"], val,
                                                     test_probs, test),
              "conformal": fit_sets(cfg, class_names, calibrated["val"], val, test_probs, test),
              "ood": ood}
    if test is not None:
        policy["test_figures"] = decision_figures(test.labels, test_probs.argmax(1),
                                                  test.patients, class_names, cfg.seed)
    in_scores = served_scores(module, (test or val).features)
    ood["in_distribution"] = {"split": "test" if test is not None else "val",
                              "images": int(len(in_scores)),
                              "pass_rate": float(np.mean(in_scores <= OOD_PASS_LIMIT))}
    plots = PolicyPlots(in_scores, {}, {s: (judged[s].probabilities, calibrated[s],
                                            judged[s].labels) for s in judged})
    if cfg.ood_sets:
        ood["evaluation"], plots.ood_sets = ood_evaluation(module, spec, in_scores)
    return policy, plots
