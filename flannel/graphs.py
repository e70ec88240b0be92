"""The modules that become served graphs: one learner, or the fused ensemble of several.

    python -c "from flannel.graphs import learner_graph; from flannel.checkpoint import load_checkpoint; print(learner_graph(load_checkpoint('runs/x/best.pt')))"

Both take the common served input, an (N, 1, R, R) batch in [0, 1] made on the host by
``flannel.preprocess`` with ``input_spec_for`` (decode, intensity policy, square resize to R).
Each learner's own resize, crop, channel copy and normalisation run inside, so the exported
graph, its parity gate and every backend built from it see the preprocessing too.

- ``LearnerGraph``: image -> (logits, probabilities).
- ``FusedEnsemble``: image -> each learner's probabilities -> ``NeuralWeightModule`` ->
  (probabilities, learner_weights). It computes exactly what the staged path does (learner
  probabilities cached per checkpoint, then the fusion), because both run these same modules.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from flannel.checkpoint import Checkpoint, state_with_metadata
from flannel.fusion import NeuralWeightModule
from flannel.preprocess import GraphPreprocess, PreprocessSpec, input_spec_for


class LearnerGraph(nn.Module):
    """One learner on the common input: image -> (logits, softmax probabilities)."""

    def __init__(self, model: nn.Module, spec: PreprocessSpec, input_side: int) -> None:
        super().__init__()
        self.preprocess = GraphPreprocess(spec, input_side)
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(self.preprocess(image))
        return logits, torch.softmax(logits, dim=1)


def learner_graph(ckpt: Checkpoint, input_side: int | None = None) -> LearnerGraph:
    """A checkpoint's learner in eval mode on an input of side ``input_side`` (default: its
    own ``resize``)."""
    side = input_side or input_spec_for([ckpt.preprocess]).resize
    return LearnerGraph(ckpt.build_model(), ckpt.preprocess, side).eval()


class FusedEnsemble(nn.Module):
    """Learners and the fusion as one module: image -> (probabilities, learner_weights).

    Args:
        learners: one ``LearnerGraph`` per member, all on the same input side.
        fusion: the neural weight module over these learners, in this order.
        names: one name per learner (the architecture), for answers and reports.
    """

    def __init__(self, learners: Sequence[LearnerGraph], fusion: NeuralWeightModule,
                 names: Sequence[str]) -> None:
        super().__init__()
        if not (len(learners) == len(names) == fusion.num_learners):
            raise ValueError(f"{len(learners)} learners, {len(names)} names and a fusion over "
                             f"{fusion.num_learners} learners do not match")
        sides = {lg.preprocess.input_side for lg in learners}
        if len(sides) != 1:
            raise ValueError(f"learners expect different input sides {sorted(sides)}")
        self.learners = nn.ModuleList(learners)
        self.fusion = fusion
        self.names = list(names)

    def learner_probabilities(self, image: torch.Tensor) -> torch.Tensor:
        """(N, L, C): each learner's class probabilities."""
        return torch.stack([lg(image)[1] for lg in self.learners], dim=1)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fusion(self.learner_probabilities(image))


FUSION_CHECKPOINT = "fusion.pt"
FUSION_FORMAT = 1


class MemberChanged(RuntimeError):
    """A learner checkpoint of an ensemble is missing or no longer the one it was fitted on."""


def save_fusion(path: str | Path, fusion: NeuralWeightModule, members: list[dict],
                class_names: list[str], meta: dict) -> Path:
    """Write the fusion's checkpoint: its weights, its members and plain metadata.

    Args:
        path: destination (``ENSEMBLE_DIR/fusion.pt``).
        fusion: the fitted neural weight module.
        members: per learner, in fusion order: ``arch``, ``checkpoint`` (path) and
            ``checkpoint_sha256``.
        class_names: output order.
        meta: JSON-like extras (gamma, alpha, config, metrics).
    """
    path = Path(path)
    payload = {"format": FUSION_FORMAT, "state_dict": fusion.state_dict(),
               "meta": {"members": members, "class_names": list(class_names), **meta}}
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def load_fusion(path: str | Path) -> tuple[NeuralWeightModule, dict]:
    """The fusion module and its metadata (``weights_only`` loading)."""
    payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FUSION_FORMAT:
        raise ValueError(f"{path}: not a flannel fusion checkpoint (format {FUSION_FORMAT})")
    meta = payload["meta"]
    fusion = NeuralWeightModule(len(meta["members"]), len(meta["class_names"]))
    fusion.load_state_dict(payload["state_dict"])
    return fusion.eval(), meta


def member_checkpoints(meta: dict) -> list[Checkpoint]:
    """Load every member checkpoint of a fusion, checking each one's sha256.

    Raises:
        MemberChanged: a checkpoint is missing or differs from the one the fusion was fitted on.
    """
    from flannel.artifacts import sha256_file
    from flannel.checkpoint import load_checkpoint

    out = []
    for m in meta["members"]:
        path = Path(m["checkpoint"])
        if not path.is_file():
            raise MemberChanged(f"member {m['arch']}: checkpoint {path} is missing")
        digest = sha256_file(path)
        if digest != m["checkpoint_sha256"]:
            raise MemberChanged(f"member {m['arch']}: {path} has sha256 {digest}, but the fusion "
                                f"was fitted on {m['checkpoint_sha256']}: fit the ensemble again")
        out.append(load_checkpoint(path))
    return out


def fused_ensemble(fusion: NeuralWeightModule, checkpoints: Sequence[Checkpoint]) -> FusedEnsemble:
    """The one-module ensemble of ``checkpoints`` (in fusion order) and a fitted fusion."""
    side = input_spec_for([c.preprocess for c in checkpoints]).resize
    learners = [learner_graph(c, side) for c in checkpoints]
    return FusedEnsemble(learners, fusion, member_names([c.arch for c in checkpoints])).eval()


def member_names(archs: Sequence[str]) -> list[str]:
    """One unique name per learner: its architecture, with "-2", "-3"... for repeats."""
    seen: dict[str, int] = {}
    names = []
    for arch in archs:
        seen[arch] = seen.get(arch, 0) + 1
        names.append(arch if seen[arch] == 1 else f"{arch}-{seen[arch]}")
    return names


def served_graph(kind: str, members: Sequence[dict], num_classes: int, input_side: int,
                 state_dict: dict | None = None) -> nn.Module:
    """Rebuild a served graph from an export manifest's description, in eval mode.

    Args:
        kind: ``"learner"`` or ``"ensemble"``.
        members: the manifest's ``members``: ``name``, ``arch`` and ``preprocess`` (a spec dict),
            in fusion order.
        num_classes: outputs of every learner.
        input_side: side R of the common (N, 1, R, R) input.
        state_dict: the module's weights (the export's ``model.eager.pt``); None keeps random ones.

    Returns:
        A ``LearnerGraph`` or ``FusedEnsemble``.
    """
    from flannel.registry import build_model

    learners = [LearnerGraph(build_model(m["arch"], num_classes),
                             PreprocessSpec.from_dict(m["preprocess"]), input_side)
                for m in members]
    if kind == "learner":
        if len(learners) != 1:
            raise ValueError(f"a learner graph has one member, the manifest lists {len(learners)}")
        module: nn.Module = learners[0]
    elif kind == "ensemble":
        module = FusedEnsemble(learners, NeuralWeightModule(len(learners), num_classes),
                               [m["name"] for m in members])
    else:
        raise ValueError(f"unknown graph kind {kind!r}")
    if state_dict is not None:
        module.load_state_dict(state_with_metadata(state_dict, module))
    return module.eval()


def load_ensemble(ensemble_dir: str | Path) -> tuple[FusedEnsemble, dict]:
    """The fused module of an ensemble folder (``fusion.pt`` plus its members' checkpoints)."""
    fusion, meta = load_fusion(Path(ensemble_dir) / FUSION_CHECKPOINT)
    return fused_ensemble(fusion, member_checkpoints(meta)), meta
