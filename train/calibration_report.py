"""The calibration section every report carries: temperature scaling fitted on the validation
split, the expected calibration error, Brier score and log loss before and after, and a
reliability diagram.

    python -c "from flannel.train.calibration_report import calibration_section; help(calibration_section)"

One function serves the learner run report (``flannel train``), the ensemble report (each learner
and the fused answer, ``flannel ensemble train``) and the external evaluation
(``flannel evaluate``). Each hands over class probabilities, the form all of them hold; their log
stands in for the logits (``flannel.calibration.logits_of``). The log of a softmax differs from the
logits by one constant per image, which softmax ignores, so ``softmax(log p / T)`` is the scaled
model's answer and the fitted temperature is the model's own (up to probabilities below
``flannel.calibration.LOG_FLOOR``, which are clipped there).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping

import numpy as np

from flannel.calibration import (ECE_BINS, Scaling, fit_scaling, logits_of, reliability_diagram,
                                 split_figures)
from flannel.data.records import read_manifest, resolve_path
from flannel.data.torch_dataset import XrayDataset

# The split a temperature is fitted on: never test, which only reports.
FIT_SPLIT = "val"
RELIABILITY_PNG = "reliability.png"
# fit_scaling's floor: fewer labelled images than this fit no temperature.
MIN_FIT_IMAGES = 2


@dataclass(frozen=True)
class CalibrationSection:
    """A report's calibration figures, their Markdown and the diagram written.

    Attributes:
        figures: the JSON section (``calibration_figures``).
        markdown: the Markdown lines (``calibration_markdown`` of ``figures``).
        diagram: the reliability diagram's path, or None when none was asked for.
    """

    figures: dict
    markdown: list[str]
    diagram: Path | None


def fit_validation_scaling(probabilities: Mapping[str, np.ndarray],
                           labels: Mapping[str, np.ndarray]) -> Scaling | None:
    """The temperature fitted by NLL on the validation probabilities, or None when there are
    fewer than ``MIN_FIT_IMAGES`` of them."""
    if FIT_SPLIT not in probabilities or len(labels[FIT_SPLIT]) < MIN_FIT_IMAGES:
        return None
    return fit_scaling(logits_of(probabilities[FIT_SPLIT]), labels[FIT_SPLIT])


def calibration_figures(probabilities: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray],
                        scaling: Scaling | None, fitted_on: dict | None = None,
                        no_scaling: str | None = None) -> dict:
    """ECE, Brier score, log loss and accuracy of each set, before and (with a scaling) after.

    Args:
        probabilities: set name -> (N, C) probabilities as the model gives them; empty sets are
            left out.
        labels: set name -> (N,) class indices.
        scaling: the calibration map to apply, or None to report the probabilities as they are.
        fitted_on: where the scaling was fitted (``{"split": "val", "images": N}``, ...).
        no_scaling: why there is no scaling, said in the report when ``scaling`` is None.

    Returns:
        ``{"scaling": Scaling dict or None, "fitted_on": ..., "bins": ECE_BINS,
        set: {"before": figures, "after": figures}}`` ("after" only with a scaling).
    """
    figures: dict = {"scaling": scaling.to_dict() if scaling else None,
                     "fitted_on": fitted_on if scaling else None, "bins": ECE_BINS}
    if scaling is None and no_scaling:
        figures["no_scaling"] = no_scaling
    for name, probs in probabilities.items():
        if not len(labels[name]):
            continue
        figures[name] = {"before": split_figures(probs, labels[name])}
        if scaling is not None:
            figures[name]["after"] = split_figures(scaling.probabilities(logits_of(probs)),
                                                   labels[name])
    return figures


def figure_sets(figures: dict) -> dict[str, dict]:
    """The per-set entries of a calibration section (the keys holding "before")."""
    return {k: v for k, v in figures.items() if isinstance(v, dict) and "before" in v}


def calibration_markdown(figures: dict, heading: str) -> list[str]:
    """The section's Markdown: how the temperature was fitted, a table per set, the diagram."""
    lines = [f"## {heading}", ""]
    bins = f"{figures['bins']} equal-mass confidence bins"
    sets = figure_sets(figures)
    if figures["scaling"] is None:
        reason = figures.get("no_scaling") or "none was fitted"
        lines += [f"No temperature scaling ({reason}). Expected calibration error over {bins}, "
                  "Brier score and log loss of the probabilities as given:", "",
                  "| set | images | accuracy | ECE | Brier | log loss |",
                  "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {name} | {f['before']['images']} | {f['before']['accuracy']:.4f} | "
                  f"{f['before']['ece']:.4f} | {f['before']['brier']:.4f} | "
                  f"{f['before']['nll']:.4f} |" for name, f in sets.items()]
    else:
        fitted = figures.get("fitted_on") or {}
        source = f" of `{fitted['manifest']}`" if fitted.get("manifest") else ""
        lines += [f"Temperature scaling fitted by log loss on the validation split{source} "
                  f"({fitted.get('images', '?')} images): T = "
                  f"{figures['scaling']['temperature']:.3f}; it keeps every decision. Expected "
                  f"calibration error over {bins}, Brier score and log loss, before and after:",
                  "", "| set | images | accuracy | ECE before | ECE after | Brier before | "
                  "Brier after | log loss before | log loss after |",
                  "|" + " --- |" * 9]
        lines += [f"| {name} | {f['before']['images']} | {f['before']['accuracy']:.4f} | "
                  f"{f['before']['ece']:.4f} | {f['after']['ece']:.4f} | "
                  f"{f['before']['brier']:.4f} | {f['after']['brier']:.4f} | "
                  f"{f['before']['nll']:.4f} | {f['after']['nll']:.4f} |"
                  for name, f in sets.items()]
    if figures.get("diagram"):
        lines += ["", f"![reliability]({figures['diagram']})"]
    return lines + [""]


def write_reliability(figures: dict, probabilities: Mapping[str, np.ndarray],
                      labels: Mapping[str, np.ndarray], path: Path, title: str) -> Path:
    """The reliability diagram of every set of ``figures``: before and, with a scaling, after."""
    scaling = Scaling.from_dict(figures["scaling"]) if figures["scaling"] else None
    panels = {name: (probabilities[name],
                     scaling.probabilities(logits_of(probabilities[name])) if scaling else None,
                     labels[name]) for name in figure_sets(figures)}
    return reliability_diagram(panels, path, title)


def calibration_section(probabilities: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray],
                        out_dir: str | Path | None, name: str = RELIABILITY_PNG, *,
                        title: str, heading: str = "Calibration", scaling: Scaling | None = None,
                        fitted_on: dict | None = None, no_scaling: str | None = None
                        ) -> CalibrationSection:
    """Fit (or apply) temperature scaling, measure it and draw the reliability diagram.

    Args:
        probabilities: set name -> (N, C) class probabilities (``"val"`` and ``"test"`` for a
            run; any name for an external set).
        labels: set name -> (N,) true class indices.
        out_dir: the report folder the diagram goes to; None writes no diagram.
        name: the diagram's path inside ``out_dir`` (the report links it by this name).
        title: the diagram's title.
        heading: the Markdown section heading.
        scaling: a scaling fitted elsewhere (the run's own validation split, for an external
            set); without one, a temperature is fitted on ``probabilities["val"]`` when it
            holds at least ``MIN_FIT_IMAGES`` images.
        fitted_on: where ``scaling`` was fitted; default the ``"val"`` set given here.
        no_scaling: why there is no scaling, when neither ``scaling`` nor a validation set is
            given.

    Returns:
        The JSON figures (with ``"diagram"``: ``name`` or None), their Markdown and the diagram.
    """
    if scaling is None:
        scaling = fit_validation_scaling(probabilities, labels)
        if scaling is not None:
            fitted_on = {"split": FIT_SPLIT, "images": int(len(labels[FIT_SPLIT]))}
        elif no_scaling is None:
            no_scaling = f"fewer than {MIN_FIT_IMAGES} validation images to fit a temperature on"
    figures = calibration_figures(probabilities, labels, scaling, fitted_on, no_scaling)
    diagram = None
    if out_dir is not None and figure_sets(figures):
        diagram = write_reliability(figures, probabilities, labels, Path(out_dir) / name, title)
    figures["diagram"] = name if diagram else None
    return CalibrationSection(figures, calibration_markdown(figures, heading), diagram)


# --- external evaluation (``flannel evaluate``) ----------------------------------------------

EXTERNAL_SET = "external"
EXTERNAL_HEADING = "Calibration on the external set"


@dataclass(frozen=True)
class RunTemperature:
    """A run's temperature fitted on its own validation split, or why it has none.

    Attributes:
        scaling: the fitted temperature, or None.
        fitted_on: ``{"split": "val", "images": N, "manifest": path}`` when fitted.
        missing: why there is no temperature, when there is none.
    """

    scaling: Scaling | None
    fitted_on: dict | None = None
    missing: str | None = None


def run_split_manifest(run_dir: str | Path) -> Path | None:
    """The split manifest a run folder's ``config.json`` records (a learner run and an ensemble
    folder both write one), resolved as written or relative to the folder; None without one."""
    config = Path(run_dir) / "config.json"
    recorded = json.loads(config.read_text()).get("manifest") if config.is_file() else None
    return resolve_path(recorded, Path(run_dir)) if recorded else None


def run_temperature(run_dir: str | Path, model, batch_size: int = 32) -> RunTemperature:
    """Fit a run's temperature on the validation split of its own split manifest, the way its
    training report fits it, with the model the external evaluation runs.

    Args:
        run_dir: the learner run or ensemble folder.
        model: what predicts its images: ``class_names``, ``preprocess`` and
            ``predict(dataset, batch_size) -> Predictions`` (``flannel.train.external``).
        batch_size: inference batch size.

    Returns:
        The temperature, or None with the reason: no manifest recorded, the manifest or its
        validation images not on this machine, or too few validation images.
    """
    manifest = run_split_manifest(run_dir)
    if manifest is None:
        return RunTemperature(None, missing="the run records no split manifest")
    if not manifest.is_file():
        return RunTemperature(None, missing=f"the run's split manifest {manifest} is not here")
    rows = [replace(r, path=str(resolve_path(r.path, manifest.parent)))
            for r in read_manifest(manifest, split=FIT_SPLIT)]
    absent = sum(not Path(r.path).is_file() for r in rows)
    if absent:
        return RunTemperature(None, missing=f"{absent} of the run's {len(rows)} validation "
                                            "images are not here")
    if len(rows) < MIN_FIT_IMAGES:
        return RunTemperature(None, missing=f"the run's split manifest holds {len(rows)} "
                                            "validation images")
    pred = model.predict(XrayDataset(rows, model.class_names, model.preprocess), batch_size)
    return RunTemperature(fit_scaling(logits_of(pred.probs), pred.targets),
                          {"split": FIT_SPLIT, "images": len(rows), "manifest": str(manifest)})


def external_calibration(predictions, out_dir: str | Path, title: str,
                         temperature: RunTemperature) -> dict:
    """The served probabilities' ECE, Brier score and log loss on an external set, before and
    after the run's own temperature when it has one, and ``reliability.png`` in ``out_dir``.

    Args:
        predictions: the external images' ``flannel.train.evaluate.Predictions`` (``probs``,
            the model's uncalibrated probabilities, and ``targets``).
        out_dir: the external report folder.
        title: the diagram's title (model and external set).
        temperature: ``run_temperature``'s answer (the validation split, never the external set:
            a temperature fitted on the images it is judged on would flatter it).

    Returns:
        The report's ``calibration`` section; ``external_markdown`` turns it into Markdown.
    """
    return calibration_section({EXTERNAL_SET: predictions.probs},
                               {EXTERNAL_SET: predictions.targets}, out_dir,
                               title=title, heading=EXTERNAL_HEADING,
                               scaling=temperature.scaling, fitted_on=temperature.fitted_on,
                               no_scaling=temperature.missing).figures


def external_markdown(figures: dict) -> list[str]:
    """The external report's calibration section."""
    return calibration_markdown(figures, EXTERNAL_HEADING)
