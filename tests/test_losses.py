"""Focal loss against a hand computation, cross-entropy as its gamma = 0 case, class weights."""
import math

import pytest
import torch
import torch.nn.functional as F

from flannel.train.losses import FocalLoss, build_loss, inverse_frequency


def test_focal_loss_matches_a_hand_computed_value():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    target = torch.tensor([0, 2])
    alpha, gamma = [0.5, 1.0, 2.0], 2.0

    def item(z, t):
        exps = [math.exp(v) for v in z]
        p = exps[t] / sum(exps)
        return -alpha[t] * (1 - p) ** gamma * math.log(p)

    expected = (item([2.0, 0.0, -1.0], 0) + item([0.5, 1.5, 0.0], 2)) / 2  # a mean, not a sum
    got = FocalLoss(gamma=gamma, alpha=alpha)(logits, target)
    assert float(got) == pytest.approx(expected, rel=1e-6)


def test_focal_loss_is_cross_entropy_at_gamma_0_and_alpha_1():
    torch.manual_seed(0)
    logits, target = torch.randn(16, 4), torch.randint(0, 4, (16,))
    assert torch.allclose(FocalLoss(gamma=0.0)(logits, target), F.cross_entropy(logits, target))
    ones = FocalLoss(gamma=0.0, alpha=[1.0] * 4)(logits, target)
    assert torch.allclose(ones, F.cross_entropy(logits, target))
    smooth = FocalLoss(gamma=0.0, label_smoothing=0.1)(logits, target)
    assert torch.allclose(smooth, F.cross_entropy(logits, target, label_smoothing=0.1))


def test_focal_loss_down_weights_easy_examples():
    easy, hard = torch.tensor([[6.0, 0.0]]), torch.tensor([[0.2, 0.0]])
    y = torch.tensor([0])
    ratio = lambda loss: float(loss(easy, y) / loss(hard, y))  # noqa: E731
    assert ratio(FocalLoss(gamma=2.0)) < ratio(FocalLoss(gamma=0.0)) / 10


def test_focal_loss_takes_bf16_logits_in_fp32():
    logits = torch.tensor([[8.0, -8.0]], dtype=torch.bfloat16)
    loss = FocalLoss(gamma=10.0)(logits, torch.tensor([0]))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_inverse_frequency_weights_mean_one_over_present_classes():
    w = inverse_frequency([0, 0, 0, 1], 3)
    assert torch.allclose(w, torch.tensor([0.5, 1.5, 0.0]))


def test_build_loss_kinds():
    w = torch.tensor([1.0, 2.0])
    assert isinstance(build_loss("ce", w), torch.nn.CrossEntropyLoss)
    focal = build_loss("focal", w, gamma=3.0)
    assert isinstance(focal, FocalLoss) and focal.gamma == 3.0 and torch.equal(focal.alpha, w)
    with pytest.raises(ValueError, match="unknown loss"):
        build_loss("hinge", None)
