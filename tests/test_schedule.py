"""Learning-rate schedules have the shape their names promise; optimisers are the ones asked for."""
import pytest
import torch
import torch.nn as nn

from flannel.train.schedule import ONECYCLE_DIV, build_optimizer, build_scheduler, lr_factor


def _curve(name, total=100, warmup=10):
    return [lr_factor(name, s, total, warmup) for s in range(total)]


def test_warmup_cosine_rises_linearly_then_decays_to_zero():
    c = _curve("warmup_cosine")
    assert c[0] == pytest.approx(1 / 11) and c[:10] == sorted(c[:10])
    assert c[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(c[10:], c[11:])) and c[-1] < 0.01


def test_onecycle_starts_low_peaks_at_30_percent_and_ends_near_zero():
    c = _curve("onecycle")
    assert c[0] == pytest.approx(1 / ONECYCLE_DIV)
    assert max(range(100), key=c.__getitem__) == 30 and c[30] == pytest.approx(1.0)
    assert c[-1] < 1e-3


def test_cosine_and_constant():
    c = _curve("cosine")
    assert c[0] == 1.0 and c[50] == pytest.approx(0.5) and c[-1] < 0.01
    assert set(_curve("constant")) == {1.0}
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_factor("step", 0, 10, 0)


def test_scheduler_steps_the_optimizer_lr():
    model = nn.Linear(2, 2)
    opt = build_optimizer("adamw", model, lr=0.1, weight_decay=0.01)
    assert isinstance(opt, torch.optim.AdamW)
    sched = build_scheduler(opt, "warmup_cosine", total_steps=20, warmup_steps=4)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1 / 5) and max(lrs) == pytest.approx(0.1)


def test_optimizers_and_frozen_models():
    model = nn.Linear(2, 2)
    assert isinstance(build_optimizer("sgd", model, 0.1, 0.0), torch.optim.SGD)
    assert type(build_optimizer("adam", model, 0.1, 0.0)) is torch.optim.Adam
    for p in model.parameters():
        p.requires_grad = False
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer("adam", model, 0.1, 0.0)
