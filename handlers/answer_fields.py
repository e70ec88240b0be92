"""What a served answer says beside its probabilities: the decision at the archive's operating
point, the conformal prediction set, the out-of-distribution score and whether to refer.

    python -c "from flannel.handlers.answer_fields import ServedPolicy; help(ServedPolicy)"

The graph already serves calibrated probabilities and ``ood_score`` (``flannel.graphs``); this
applies the rest of the archive's ``answer_policy.json`` (``flannel.export.answer_policy``) to
them, with the same functions the export measured them with. ``refer`` is True when a person
should look before anyone acts on the answer: the prediction set holds more than one class (or
none), no class cleared its threshold, or the image is not like the training radiographs.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from flannel.artifacts import OOD_PASS_LIMIT as OOD_LIMIT
from flannel.conformal import Conformal
from flannel.operating_point import OperatingPoint


def ood_warning(score: float) -> str:
    # One clause: v2 answers join an image's warnings with "; ".
    return (f"ood_score {score:.3g} > {OOD_LIMIT:g}: this image is not like the chest "
            "radiographs the model was trained and validated on, so its answer is not to be "
            "trusted")


@dataclass(frozen=True)
class ServedPolicy:
    """The operating point and the prediction sets of one archive."""

    point: OperatingPoint
    conformal: Conformal

    @classmethod
    def from_json(cls, data: bytes | str, class_names: Sequence[str]) -> "ServedPolicy":
        """Parse ``answer_policy.json``; its classes must be the archive's.

        Raises:
            ValueError: another model's policy, or one this code cannot read.
        """
        policy = json.loads(data)
        if list(policy.get("class_names", [])) != list(class_names):
            raise ValueError(f"answer_policy.json is for classes {policy.get('class_names')}, "
                             f"the archive serves {list(class_names)}")
        return cls(OperatingPoint.from_dict(policy["operating_point"]),
                   Conformal.from_dict(policy["conformal"]))

    def fields(self, probs: np.ndarray, ood: np.ndarray) -> list[dict]:
        """Per image: ``decision``, ``prediction_set``, ``refer`` with its reasons, ``ood_score``.

        Args:
            probs: (N, C) calibrated probabilities from the graph.
            ood: (N,) the graph's ``ood_score``.
        """
        names = self.point.class_names
        decisions, cleared = self.point.decide(probs)
        sets = self.conformal.sets(probs)
        out = []
        for d, ok, members, score in zip(decisions, cleared, sets, np.asarray(ood, np.float64)):
            reasons = []
            if members.sum() != 1:
                reasons.append(f"the prediction set holds {int(members.sum())} classes")
            if not ok:
                reasons.append("no class cleared its threshold")
            if score > OOD_LIMIT:
                reasons.append("not like the training images")
            out.append({"decision": names[int(d)],
                        "prediction_set": [n for n, m in zip(names, members) if m],
                        "refer": bool(reasons), "refer_reasons": reasons,
                        "ood_score": float(score)})
        return out
