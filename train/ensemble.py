"""`flannel ensemble train|eval`: FLANNEL's fusion of the best k learners, with its baselines.

    flannel ensemble train --runs runs/a,runs/b,runs/c --k 3 --out runs/ensemble
    flannel ensemble train --preset lite --manifest data/manifest.csv --epochs 10 --out runs/ens
    flannel ensemble eval runs/ensemble

``train`` picks the best k learner runs by validation macro-F1 (training a preset's learners first
when asked, reusing finished runs), caches their probabilities on every split, fits the neural
weight module on the validation split with the test split untouched, and writes the ensemble
folder: ``fusion.pt`` (the fusion's weights, its members by checkpoint sha256, gamma, alpha, the
config), ``config.json`` and the report (``ensemble_report.{json,md}``, confusion matrices, the
learner-weight plot and the reliability diagrams of the fused answer and of each learner).
``eval`` rewrites the report from ``fusion.pt`` and the cache.

Why the validation split: the learners were fitted on the training split, so their training-split
probabilities are overconfident and would teach the fusion to trust whichever learner memorised
most. Validation images were only used to pick each learner's best epoch, which is a far weaker
fit. Gamma is chosen by stratified 5-fold cross-validation inside the validation split; nothing is
chosen on the test split.
"""
from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from flannel.graphs import FUSION_CHECKPOINT, load_fusion, member_names, save_fusion
from flannel.labels import COVID_CLASS, NORMAL_CLASS
from flannel.metrics import classification_metrics
from flannel.preprocess import PreprocessSpec, input_spec_for
from flannel.train.calibration_report import calibration_section
from flannel.train.ensemble_data import learner_probabilities, select_learners
from flannel.train.fusion_fit import (FLANNEL_GAMMA, GAMMA_GRID, Stacking, fit_fusion,
                                      fused_outputs, majority_vote, mean_probs)

log = logging.getLogger(__name__)
PRESETS = {
    # Five small learners that train on a CPU: the embedded default.
    "lite": ("squeezenet1_1", "shufflenet_v2_x1_0", "mnasnet1_0", "resnet18", "densenet121"),
    # FLANNEL's five, for GPU hosts.
    "paper": ("densenet161", "inception_v3", "resnet152", "resnext101_32x8d", "vgg19_bn"),
}
# Preset training scales squeezenet1_1's learning rate. Its classifier is a 1x1 convolution
# followed by ReLU; Adam moves each of that convolution's 512 input weights by about lr per step,
# so at the shared lr (1e-3, or 3e-4 on the real data) every output unit is pushed below zero
# within an epoch and the network answers every image alike. A tenth of it trains.
PRESET_LR_SCALE = {"squeezenet1_1": 0.1}
DEFAULT_K = 5
REPORT_NAME = "ensemble_report"
# Each learner's reliability diagram, inside the ensemble folder.
LEARNER_CALIBRATION_DIR = "calibration"


@dataclass
class EnsembleConfig:
    """How an ensemble is built; saved as ``config.json`` and inside ``fusion.pt``."""

    out: str
    runs: list[str] = field(default_factory=list)
    k: int = DEFAULT_K
    scheme: str = "3class"
    gammas: list[float] = field(default_factory=lambda: list(GAMMA_GRID))
    seed: int = 0
    batch_size: int = 32
    cache_dir: str | None = None
    model_name: str = "ensemble"

    def cache(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else Path(self.out) / "cache"


def _scores_row(name: str, kind: str, probs: np.ndarray, targets: np.ndarray,
                class_names: list[str], scheme: str) -> dict:
    m = classification_metrics(targets, probs.argmax(axis=1), class_names,
                               normal_class=NORMAL_CLASS.get(scheme))
    covid = COVID_CLASS[scheme]
    return {"name": name, "kind": kind, "accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
            "covid_recall": m["per_class"][covid]["recall"],
            "sick_called_normal": sum(m.get("called_normal", {}).values()),
            "per_class_f1": {c: m["per_class"][c]["f1"] for c in class_names},
            "confusion": m["confusion"]}


def compare_methods(data: dict, fusion, flannel10, stacking: Stacking, names: list[str],
                    class_names: list[str], scheme: str, split: str) -> list[dict]:
    """Scores of each learner, each baseline and FLANNEL on ``split``."""
    probs, targets = data[split].probs, data[split].targets
    rows = [_scores_row(n, "learner", probs[:, i], targets, class_names, scheme)
            for i, n in enumerate(names)]
    rows.append(_scores_row("mean", "baseline", mean_probs(probs), targets, class_names, scheme))
    rows.append(_scores_row("majority vote", "baseline", majority_vote(probs), targets,
                            class_names, scheme))
    rows.append(_scores_row("stacking (logistic)", "baseline", stacking.predict_proba(probs),
                            targets, class_names, scheme))
    rows.append(_scores_row(f"FLANNEL (gamma {fusion.gamma:g})", "flannel",
                            fused_outputs(fusion.module, probs)[0], targets, class_names, scheme))
    if flannel10 is not None:
        rows.append(_scores_row(f"FLANNEL (gamma {FLANNEL_GAMMA:g}, the paper's)", "flannel",
                                fused_outputs(flannel10.module, probs)[0], targets, class_names,
                                scheme))
    return rows


def weights_by_class(fusion_module, data, names: list[str], class_names: list[str],
                     split: str) -> dict:
    """Mean learner weight per true class on ``split``: {class: {learner: weight}}."""
    probs, targets = data[split].probs, data[split].targets
    _, weights = fused_outputs(fusion_module, probs)
    return {c: {n: float(weights[targets == i, j].mean()) if (targets == i).any() else None
                for j, n in enumerate(names)} for i, c in enumerate(class_names)}


def train_ensemble(cfg: EnsembleConfig) -> dict:
    """Select, cache, fit and report; writes the ensemble folder ``cfg.out``.

    Returns:
        The report (also ``ensemble_report.json``).
    """
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    chosen, ranking = select_learners(cfg.runs, cfg.k)
    from flannel.checkpoint import load_checkpoint

    specs = [load_checkpoint(c.checkpoint).preprocess for c in chosen]
    input_spec = input_spec_for(specs)
    names = member_names([c.arch for c in chosen])
    class_names = chosen[0].class_names
    data = learner_probabilities(chosen, input_spec, cfg.cache(), cfg.batch_size)
    fit_on = data["val"]
    log.info("fitting the fusion of %s on %d validation images", ", ".join(names),
             len(fit_on.targets))
    fusion = fit_fusion(fit_on.probs, fit_on.targets, cfg.gammas, cfg.seed)
    flannel10 = None if fusion.gamma == FLANNEL_GAMMA else fit_fusion(
        fit_on.probs, fit_on.targets, [FLANNEL_GAMMA], cfg.seed)
    members = [c.member(n) for c, n in zip(chosen, names)]
    for m, spec in zip(members, specs):
        m["preprocess"] = spec.to_dict()
    meta = {"model_name": cfg.model_name, "gamma": fusion.gamma, "alpha": fusion.alpha,
            "gamma_cv_macro_f1": fusion.cv_macro_f1, "fitted_on": "val",
            "input_spec": input_spec.to_dict(), "config": {**asdict(cfg),
                                                           "manifest": str(chosen[0].manifest)},
            "ranking": [{"arch": c.arch, "run_dir": str(c.run_dir),
                         "val_macro_f1": c.val_macro_f1,
                         "collapsed_at_epoch": c.collapsed_at_epoch} for c in ranking]}
    save_fusion(out / FUSION_CHECKPOINT, fusion.module, members, class_names, meta)
    (out / "config.json").write_text(json.dumps(meta["config"], indent=2) + "\n")
    stacking = Stacking(cfg.seed).fit(fit_on.probs, fit_on.targets)
    return write_ensemble_report(out, data, fusion, flannel10, stacking, names, class_names,
                                 cfg.scheme, meta)


def write_ensemble_report(out: Path, data: dict, fusion, flannel10, stacking, names, class_names,
                          scheme: str, meta: dict) -> dict:
    from flannel.train.ensemble_report import write_report_files

    splits = [s for s in ("val", "test") if len(data[s].targets)]
    report = {"members": names, "class_names": class_names, "scheme": scheme,
              "gamma": fusion.gamma, "flannel_gamma": FLANNEL_GAMMA,
              "gamma_cv_macro_f1": fusion.cv_macro_f1, "alpha": fusion.alpha,
              "fitted_on": "val", "ranking": meta["ranking"],
              "images": {s: int(len(data[s].targets)) for s in data},
              "methods": {s: compare_methods(data, fusion, flannel10, stacking, names,
                                             class_names, scheme, s) for s in splits},
              "learner_weights_by_class": {s: weights_by_class(fusion.module, data, names,
                                                                class_names, s)
                                           for s in splits},
              "calibration": fused_calibration(fusion.module, data, splits, out),
              "learner_calibration": learner_calibration(data, names, splits, out)}
    write_report_files(out, report, data, fusion.module)
    return report


def fused_calibration(module, data: dict, splits: list[str], out: Path) -> dict:
    """Temperature scaling of the fused probabilities fitted on validation, with the ECE, Brier
    score and log loss before and after on every split, and ``reliability.png`` in ``out``
    (``flannel.train.calibration_report``)."""
    fused = {s: fused_outputs(module, data[s].probs)[0] for s in splits}
    return calibration_section(fused, {s: data[s].targets for s in splits}, out,
                               title="FLANNEL fused probabilities: temperature scaling fitted on "
                                     "val").figures


def learner_calibration(data: dict, names: list[str], splits: list[str],
                        out: Path | None) -> dict:
    """Each learner's temperature scaling fitted on validation (its cached probabilities), with
    the same figures as the fused answer's and a diagram per learner under
    ``out/LEARNER_CALIBRATION_DIR`` (none when ``out`` is None): {learner: calibration figures}."""
    labels = {s: data[s].targets for s in splits}
    return {name: calibration_section({s: data[s].probs[:, i] for s in splits}, labels, out,
                                      f"{LEARNER_CALIBRATION_DIR}/{name}.png",
                                      title=f"learner {name}: temperature scaling fitted on val"
                                      ).figures
            for i, name in enumerate(names)}


def evaluate_ensemble(ensemble_dir: str | Path) -> dict:
    """Rewrite the report of an ensemble folder from ``fusion.pt`` (probabilities from the cache;
    the members' checkpoints must be the ones it was fitted on)."""
    from flannel.graphs import member_checkpoints
    from flannel.train.ensemble_data import candidate
    from flannel.train.fusion_fit import FusionFit

    out = Path(ensemble_dir)
    module, meta = load_fusion(out / FUSION_CHECKPOINT)
    ckpts = member_checkpoints(meta)  # raises when a member changed
    cfg = EnsembleConfig(**{k: v for k, v in meta["config"].items() if k != "manifest"})
    chosen = [candidate(m["run_dir"]) for m in meta["members"]]
    input_spec = PreprocessSpec.from_dict(meta["input_spec"])
    if input_spec != input_spec_for([c.preprocess for c in ckpts]):
        raise ValueError(f"{out}: the members' preprocessing no longer gives the fitted input spec")
    data = learner_probabilities(chosen, input_spec, cfg.cache(), cfg.batch_size)
    fusion = FusionFit(module, meta["gamma"], meta["alpha"], meta["gamma_cv_macro_f1"])
    flannel10 = None if fusion.gamma == FLANNEL_GAMMA else fit_fusion(
        data["val"].probs, data["val"].targets, [FLANNEL_GAMMA], cfg.seed)
    stacking = Stacking(cfg.seed).fit(data["val"].probs, data["val"].targets)
    return write_ensemble_report(out, data, fusion, flannel10, stacking,
                                 [m["name"] for m in meta["members"]], meta["class_names"],
                                 cfg.scheme, meta)


def preset_overrides(archs, train_cfg) -> dict[str, dict]:
    """Per-learner departures from the shared recipe (``PRESET_LR_SCALE``)."""
    return {a: {"lr": train_cfg.lr * PRESET_LR_SCALE[a]} for a in archs if a in PRESET_LR_SCALE}


def train_learners(archs, train_cfg, learners_dir: str | Path) -> dict:
    """Train (or reuse) each learner with one recipe and the preset's per-learner learning rates;
    returns the comparison (``flannel train compare``'s table, written under ``learners_dir``)."""
    from flannel.train.compare import compare_architectures

    return compare_architectures(train_cfg, list(archs), learners_dir,
                                 preset_overrides(archs, train_cfg))


def train_preset(preset: str, train_cfg, out: str | Path) -> list[str]:
    """Train (or reuse) every learner of a preset; returns their run folders."""
    learners = Path(out) / "learners"
    train_learners(PRESETS[preset], train_cfg, learners)
    return [str(learners / arch) for arch in PRESETS[preset]]


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def register(parser: argparse.ArgumentParser) -> None:
    from flannel.train.cli import add_train_options

    sub = parser.add_subparsers(dest="ensemble_command", metavar="COMMAND", required=True)
    t = sub.add_parser("train", help="fit FLANNEL's fusion over the best k learner runs",
                       description=__doc__.splitlines()[0])
    add_train_options(t, manifest_required=False)
    t.add_argument("--runs", type=_names, default=[],
                   help="finished learner run folders, comma-separated")
    t.add_argument("--preset", choices=sorted(PRESETS),
                   help="train this preset's learners first (with the training options given)")
    t.add_argument("--k", type=int, default=DEFAULT_K, help="learners kept, best val macro-F1")
    t.add_argument("--gammas", type=lambda s: [float(v) for v in _names(s)],
                   default=list(GAMMA_GRID), help="focal-loss gammas tried by CV on val")
    t.add_argument("--cache-dir", default=None, help="learner probability cache (default OUT/cache)")
    t.add_argument("--model-name", default="ensemble", help="served model name")
    t.set_defaults(func=run_train, out="runs/ensemble")
    e = sub.add_parser("eval", help="rewrite an ensemble folder's report")
    e.add_argument("ensemble_dir", metavar="ENSEMBLE_DIR")
    e.set_defaults(func=run_eval)


def run_train(args: argparse.Namespace) -> int:
    from flannel.train.cli import config_from_args

    runs = list(args.runs)
    try:
        if args.preset:
            if not args.manifest:
                raise ValueError("--preset needs --manifest to train its learners")
            runs += train_preset(args.preset, config_from_args(args), args.out)
        if not runs:
            raise ValueError("give --runs RUN_DIR,... or --preset NAME")
        cfg = EnsembleConfig(out=args.out, runs=runs, k=min(args.k, len(runs)), scheme=args.scheme,
                             gammas=args.gammas, seed=args.seed, batch_size=args.batch_size,
                             cache_dir=args.cache_dir, model_name=args.model_name)
        train_ensemble(cfg)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"flannel ensemble train: {err}") from None
    print((Path(args.out) / f"{REPORT_NAME}.md").read_text())
    return 0


def run_eval(args: argparse.Namespace) -> int:
    try:
        evaluate_ensemble(args.ensemble_dir)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        raise SystemExit(f"flannel ensemble eval: {err}") from None
    print((Path(args.ensemble_dir) / f"{REPORT_NAME}.md").read_text())
    return 0
