"""Logistic-regression baseline: it learns a separable toy set and cannot learn shuffled labels."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from flannel.data.records import read_manifest
from flannel.data.torch_dataset import XrayDataset
from flannel.labels import get_scheme
from flannel.preprocess import PreprocessSpec
from flannel.train.baseline import logistic_baseline, pixel_features
from toy_data import make_toy_dataset

SCHEME = "3class"
CLASSES = list(get_scheme(SCHEME).classes)
SPEC = PreprocessSpec.for_input_size(64)
# 40 test images per class: with shuffled labels the accuracy is 1/3 with a standard deviation of
# sqrt(1/3 * 2/3 / 120) = 0.043, so 0.55 is five deviations above chance.
PER_CLASS = {"train": 40, "test": 40}
CHANCE_CEILING = 0.55


@pytest.fixture(scope="module")
def toy_rows(tmp_path_factory):
    manifest = make_toy_dataset(tmp_path_factory.mktemp("baseline"), scheme=SCHEME,
                                per_class=PER_CLASS, size=64)
    return read_manifest(manifest)


def _datasets(rows):
    return ({split: XrayDataset([r for r in rows if r.split == split], CLASSES, SPEC)
             for split in PER_CLASS})


def test_separable_toy_set_scores_high(toy_rows):
    sets = _datasets(toy_rows)
    results = logistic_baseline(sets["train"], {"test": sets["test"]}, CLASSES, SCHEME)
    assert set(results) == {"test"}
    assert results["test"]["n"] == 3 * PER_CLASS["test"]
    assert results["test"]["accuracy"] >= 0.95
    assert results["test"]["macro_f1"] >= 0.95


def test_labels_shuffled_away_from_the_images_score_near_chance(toy_rows):
    rng = np.random.default_rng(0)
    labels = rng.permutation([r.label for r in toy_rows])
    shuffled = [dataclasses.replace(r, label=str(label)) for r, label in zip(toy_rows, labels)]
    sets = _datasets(shuffled)
    results = logistic_baseline(sets["train"], {"test": sets["test"]}, CLASSES, SCHEME)
    assert results["test"]["accuracy"] < CHANCE_CEILING


def test_features_are_area_downsampled_pixels(toy_rows):
    dataset = XrayDataset(toy_rows[:2], CLASSES, SPEC)
    features = pixel_features(dataset, side=8)
    assert features.shape == (2, 64)
    # Area mode averages: the mean brightness of the cached image survives downsampling.
    np.testing.assert_allclose(features.mean(axis=1),
                               [float(dataset.resized(i).mean()) for i in range(2)], atol=0.02)
