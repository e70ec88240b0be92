"""The ``robust`` augmentation preset: each source-cue-destroying step fires and does what it says.

    .venv/bin/pytest tests/test_augment.py -q
"""
from __future__ import annotations

import pytest
import torch

from flannel.preprocess import PreprocessSpec
from flannel.train.augment import (LETTERBOX_RANGE, ROBUST_PROBABILITIES, base_transform,
                                   draw_robust_steps, get_transform, jpeg_reencode, robust_image,
                                   robust_transform)

SPEC = PreprocessSpec.for_input_size(64)  # resize 73, crop 64
DRAWS = 200
# Each step's firing rate over 2,000 draws: 0.05 is at least 4 binomial standard deviations.
RATE_TOLERANCE = 0.05
# JPEG error jumps at 8x8 block edges: at quality 30..95 its gradient across block boundaries is
# on average about 1.9x that inside blocks (1.0 for an error without block structure).
MIN_BLOCKINESS = 1.3


def smooth_radiograph(side: int = SPEC.resize) -> torch.Tensor:
    """(1, side, side) smooth image in [0.1, 0.9] with a horizontal trend, no zeros."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, side), torch.linspace(-1, 1, side),
                            indexing="ij")
    image = 0.5 + 0.25 * torch.cos(3 * xx + 1) * torch.exp(-yy ** 2) + 0.1 * xx
    return image.clamp(0.1, 0.9)[None]


def only(step: str) -> dict[str, float]:
    """Probabilities that fire ``step`` every draw and nothing else."""
    return {name: float(name == step) for name in ROBUST_PROBABILITIES}


def blockiness(error: torch.Tensor) -> float:
    """Mean |horizontal step| of ``error`` across 8-pixel block edges over that inside blocks."""
    steps = (error[..., 1:] - error[..., :-1]).abs().mean(dim=(0, 1))
    at_edge = torch.arange(steps.numel()) % 8 == 7
    return float(steps[at_edge].mean() / steps[~at_edge].mean())


def test_robust_output_matches_the_base_preset_and_leaves_the_cache_intact():
    image = smooth_radiograph()
    before = image.clone()
    torch.manual_seed(0)
    robust, base = robust_transform(image, SPEC), base_transform(image, SPEC)
    assert (robust.shape, robust.dtype) == (base.shape, base.dtype) == ((3, 64, 64), torch.float32)
    assert robust.is_contiguous() and torch.equal(image, before)
    assert get_transform("robust") is robust_transform


def test_robust_preset_is_reproducible_under_a_seed():
    image = smooth_radiograph()
    runs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        runs.append(torch.stack([robust_transform(image, SPEC) for _ in range(8)]))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_each_step_fires_at_its_probability_in_a_fixed_order():
    torch.manual_seed(0)
    draws = [draw_robust_steps() for _ in range(2000)]
    order = list(ROBUST_PROBABILITIES)
    assert all(d == sorted(d, key=order.index) for d in draws)
    for name, p in ROBUST_PROBABILITIES.items():
        rate = sum(name in d for d in draws) / len(draws)
        assert rate == pytest.approx(p, abs=RATE_TOLERANCE), name
        assert 0.0 < p < 1.0


def test_jpeg_step_changes_pixels_with_8x8_block_structure():
    image = (smooth_radiograph(64) * 255).round() / 255  # already 8-bit: only JPEG changes it
    torch.manual_seed(0)
    errors = [robust_image(image, only("jpeg")) - image for _ in range(50)]
    assert all(e.abs().max() > 0.5 / 255 for e in errors)  # at least one grey level moved
    assert sum(blockiness(e) for e in errors) / len(errors) > MIN_BLOCKINESS
    assert blockiness(jpeg_reencode(image, 30) - image) > 2.0


def test_letterbox_step_leaves_exact_black_bars_on_two_opposite_sides():
    image = smooth_radiograph()  # no zero pixel of its own
    side = image.shape[-1]
    low, high = (int(side * f) for f in LETTERBOX_RANGE)
    torch.manual_seed(0)
    axes = set()
    for _ in range(DRAWS):
        out = robust_image(image, only("letterbox"))[0]
        black_cols, black_rows = (out == 0).all(0), (out == 0).all(1)
        axes.add("cols" if black_cols.any() else "rows")
        black = black_cols if black_cols.any() else black_rows
        assert black[:low].all() and black[side - low:].all()  # a bar at each end
        assert int(black.int().diff().abs().sum()) == 2  # bar, content, bar
        assert int((~black).sum()) >= side - 2 * high
    assert axes == {"rows", "cols"}


@pytest.mark.parametrize("step", ["gamma", "contrast", "border_crop", "rescale"])
def test_every_draw_of_each_step_changes_the_image_its_own_way(step):
    image = smooth_radiograph()
    image[..., ::2, ::2] += 0.05  # fine texture that resampling must blur
    torch.manual_seed(0)
    outs = [robust_image(image, only(step)) for _ in range(DRAWS)]
    means = torch.tensor([o.mean() for o in outs]) - image.mean()
    stds = torch.tensor([o.std() for o in outs]) - image.std()
    if step == "gamma":  # brighter and darker, never the same
        assert (means > 0.01).any() and (means < -0.01).any() and (means.abs() > 0).all()
    elif step == "contrast":  # flatter and steeper around the same mean
        assert (stds > 0.01).any() and (stds < -0.01).any()
    elif step == "border_crop":  # zooming in on the horizontal trend narrows the range
        narrower = [float(o.max() - o.min()) < float(image.max() - image.min()) for o in outs]
        assert sum(narrower) >= 0.9 * DRAWS
    else:  # resampling through a lower resolution removes the 1-pixel texture
        texture = [(o[..., 1:] - o[..., :-1]).abs().mean() for o in outs]
        assert max(texture) < (image[..., 1:] - image[..., :-1]).abs().mean()


def test_image_statistics_stay_in_range():
    image = smooth_radiograph()
    torch.manual_seed(0)
    outs = torch.stack([robust_image(image) for _ in range(DRAWS)])
    assert outs.isfinite().all() and outs.min() >= 0.0 and outs.max() <= 1.0
    assert outs.flatten(1).std(1).min() > 0.05  # never blanked out
    assert outs.mean() == pytest.approx(float(image.mean()), abs=0.05)
    mean, std = torch.tensor(SPEC.mean).view(3, 1, 1), torch.tensor(SPEC.std).view(3, 1, 1)
    final = torch.stack([robust_transform(image, SPEC) for _ in range(20)])
    assert ((final >= -mean / std - 1e-5) & (final <= (1 - mean) / std + 1e-5)).all()
