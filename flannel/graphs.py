"""The modules that become served graphs: one learner, or the fused ensemble of several.

    python -c "from flannel.graphs import learner_graph; from flannel.checkpoint import load_checkpoint; print(learner_graph(load_checkpoint('runs/x/best.pt')))"

Both take the common served input, an (N, 1, R, R) batch in [0, 1] made on the host by
``flannel.preprocess`` with ``input_spec_for`` (decode, intensity policy, square resize to R).
Each learner's own resize, crop, channel copy and normalisation run inside, so the exported
graph, its parity gate and every backend built from it see the preprocessing too.

- ``LearnerGraph``: image -> (logits, probabilities, ood_score).
- ``FusedEnsemble``: image -> each learner's probabilities -> ``NeuralWeightModule`` ->
  (probabilities, learner_weights, ood_score). It computes exactly what the staged path does
  (learner probabilities cached per checkpoint, then the fusion), because both run these same
  modules.

Both carry what export fits on the run's own splits (``flannel.export.answer_policy``): the
temperature that calibrates the served probabilities and the out-of-distribution score's
statistics (``flannel.ood``), as buffers, so the exported graph, its gates and every backend
compute the calibrated answer and the score. Until fitted they are the identity and 0.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from flannel.calibration import LOG_FLOOR
from flannel.checkpoint import Checkpoint, state_with_metadata
from flannel.fusion import NeuralWeightModule
from flannel.ood import MahalanobisDistance
from flannel.preprocess import GraphPreprocess, PreprocessSpec, input_spec_for
from flannel.registry import ARCHITECTURES


class LearnerGraph(nn.Module):
    """One learner on the common input: image -> (logits, probabilities, ood_score).

    ``probabilities`` are the softmax of the calibrated logits (``LogitScaling``: ``1/T`` for
    temperature scaling, the identity until export fits it on the validation split);
    ``ood_score`` is the Mahalanobis distance of the features the classifier head reads, over
    the threshold (``flannel.ood``; 0 until fitted).

    Args:
        model: a registry model.
        spec: its preprocessing.
        input_side: side R of the common input.
        arch: its registry name (finds the classifier head whose input are the features).
        num_classes: outputs of the head.
    """

    def __init__(self, model: nn.Module, spec: PreprocessSpec, input_side: int, arch: str,
                 num_classes: int) -> None:
        super().__init__()
        self.preprocess = GraphPreprocess(spec, input_side)
        self.model = model
        head = model.get_submodule(ARCHITECTURES[arch].head)
        self.ood = MahalanobisDistance(num_classes, feature_width(head))
        self.calibration = LogitScaling(num_classes)
        self.register_buffer("ood_scale", torch.ones(()))
        self._features: torch.Tensor | None = None
        head.register_forward_pre_hook(self._keep_features)

    def _keep_features(self, _module: nn.Module, args: tuple) -> None:
        self._features = args[0]

    def logits_and_features(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, C) logits and the (N, D) features the classifier head read."""
        logits = self.model(self.preprocess(image))
        features, self._features = self._features, None
        if features.ndim == 4:  # a convolutional head (squeezenet): its input, pooled
            features = features.mean(dim=(2, 3))
        # fp32 whatever the network computes in (bf16, fp16 backends): the distance needs range.
        return logits, features.float()

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, features = self.logits_and_features(image)
        probabilities = torch.softmax(self.calibration(logits), dim=1)
        return logits, probabilities, self.ood(features) * self.ood_scale

    def parts(self, image: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Uncalibrated probabilities and the features of each member (itself) for export's
        fitting (``flannel.export.answer_policy``)."""
        logits, features = self.logits_and_features(image)
        return torch.softmax(logits, dim=1), [features]

    @property
    def ood_members(self) -> list["LearnerGraph"]:
        return [self]


class LogitScaling(nn.Module):
    """``logits * scale + bias`` per class: temperature scaling is ``scale = 1/T, bias = 0``,
    vector scaling any of them (``flannel.calibration.Scaling``). The identity until fitted."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.register_buffer("scale", torch.ones(num_classes))
        self.register_buffer("bias", torch.zeros(num_classes))

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits * self.scale + self.bias

    def load_scaling(self, scaling) -> None:
        """Set from a fitted ``flannel.calibration.Scaling``."""
        n = self.scale.numel()
        if scaling.kind == "vector":
            self.scale.copy_(torch.tensor(scaling.scale, dtype=torch.float32))
            self.bias.copy_(torch.tensor(scaling.bias, dtype=torch.float32))
        else:
            self.scale.copy_(torch.full((n,), 1.0 / scaling.temperature))
            self.bias.zero_()


def feature_width(head: nn.Module) -> int:
    """Width D of the features a classifier head reads (a Linear or a 1x1 convolution)."""
    for attr in ("in_features", "in_channels"):
        if hasattr(head, attr):
            return int(getattr(head, attr))
    raise ValueError(f"cannot tell the input width of the classifier head {head!r}")


def learner_graph(ckpt: Checkpoint, input_side: int | None = None) -> LearnerGraph:
    """A checkpoint's learner in eval mode on an input of side ``input_side`` (default: its
    own ``resize``)."""
    side = input_side or input_spec_for([ckpt.preprocess]).resize
    return LearnerGraph(ckpt.build_model(), ckpt.preprocess, side, ckpt.arch,
                        len(ckpt.class_names)).eval()


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

        self.calibration = LogitScaling(fusion.num_classes)
        self.register_buffer("ood_scale", torch.ones(()))

    def learner_probabilities(self, image: torch.Tensor) -> torch.Tensor:
        """(N, L, C): each learner's class probabilities (uncalibrated: what the fusion read)."""
        return self.members(image)[0]

    def members(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, L, C) learner probabilities and (N, L) learner Mahalanobis distances.

        Each member is called as a module (so an exported node's scope names its learner); its
        own calibration stays the identity and its ``ood_scale`` 1, since the fusion was fitted
        on raw probabilities and the ensemble scales the mean distance itself.
        """
        outputs = [lg(image) for lg in self.learners]
        return (torch.stack([o[1] for o in outputs], dim=1),
                torch.stack([o[2] for o in outputs], dim=1))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        probs, distances = self.members(image)
        fused, weights = self.fusion(probs)
        # The logits of fused probabilities are their log (flannel.calibration.logits_of).
        calibrated = torch.softmax(self.calibration(torch.log(fused.clamp_min(LOG_FLOOR))), dim=1)
        return calibrated, weights, distances.mean(dim=1) * self.ood_scale

    def parts(self, image: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Uncalibrated fused probabilities and each member's features."""
        features = []
        probs = []
        for lg in self.learners:
            logits, f = lg.logits_and_features(image)
            probs.append(torch.softmax(logits, dim=1))
            features.append(f)
        return self.fusion(torch.stack(probs, dim=1))[0], features

    @property
    def ood_members(self) -> list[LearnerGraph]:
        return list(self.learners)


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
                             PreprocessSpec.from_dict(m["preprocess"]), input_side, m["arch"],
                             num_classes)
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
