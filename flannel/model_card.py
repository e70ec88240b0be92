"""The model card every archive carries: what the model is for, what it learned from, and every
figure that says how far to trust it, each read from the file that recorded it.

    flannel card model_store/ensemble.mar            # the card inside an archive (--json: the JSON)
    python -c "from flannel.model_card import collect_card, card_markdown; help(collect_card)"

``flannel archive`` collects the card from the run folder and its export (``collect_card``), writes
``model_card.json`` and ``MODEL_CARD.md`` into the export folder and into the archive, and lists
both in the archive's manifest with their sha256, so the handler refuses a changed card like any
other artifact. A figure that was never measured is named with why (``{"missing": "not run"}`` in
the JSON, "cross-validation: not run" in the Markdown), never left out. Sources:

- the split manifest and ``split_summary.json`` beside it: data per source and class, the
  patient-level split and its deduplication counts; ``audit.json`` beside it: the metadata-only
  shortcut audit (``flannel data audit ... --json``);
- the run's ``report.json`` (a learner) or ``ensemble_report.json`` (an ensemble): internal test
  figures; each learner's ``report.json``: the harmonised-image shortcut check; a
  ``cv_report.json`` of the same architecture and manifest in the run folder or beside it:
  cross-validation;
- ``RUN_DIR/external/*/report.json``: every external evaluation of this model;
- the export's ``answer_policy.json``: bootstrap intervals, calibration, operating point,
  conformal sets and OOD figures; its ``manifest.json``: gates, pins and versions.
"""
from __future__ import annotations

import datetime as _dt
import json
from collections import Counter, defaultdict
from functools import partial
from pathlib import Path

from flannel.artifacts import ANSWER_POLICY, ARTIFACT_FILES, MODEL_CARD

CARD_FORMAT = 1
CARD_JSON = "model_card.json"
CARD_MARKDOWN = "MODEL_CARD.md"
# The card's entries in the archive's manifest (the handler checks their sha256 at load).
CARD_JSON_ARTIFACT = MODEL_CARD
CARD_MARKDOWN_ARTIFACT = "model_card_markdown"
CARD_ARTIFACTS = {CARD_JSON_ARTIFACT: CARD_JSON, CARD_MARKDOWN_ARTIFACT: CARD_MARKDOWN}
POLICY_NAME = ARTIFACT_FILES[ANSWER_POLICY]
AUDIT_NAME = "audit.json"
CV_REPORT_NAME = "cv_report.json"
SPLIT_SUMMARY_NAME = "split_summary.json"  # flannel.data.split.SUMMARY_NAME, read without sklearn
EXTERNAL_DIR = "external"  # flannel.train.external.EXTERNAL_DIR: RUN_DIR/external/<name>/
EXTERNAL_REPORT = "report.json"
UNVALIDATED_FLAG = "--allow-unvalidated"
NOT_RUN = "not run"
NO_EXTERNAL = f"none (built with {UNVALIDATED_FLAG})"
NO_POLICY = f"missing (the export has no {POLICY_NAME})"
CALIBRATION_SPLITS = ("val", "test")

INTENDED_USE = (
    "Research and engineering evaluation: ranking frontal (PA/AP) chest radiographs by the "
    "probability of each class, as an aid to a reader who makes the decision.",
    "Comparing models and serving backends under the same gates and figures.",
)
MISUSE = (
    "Diagnosis, triage or treatment decisions without a radiologist: this is not a medical "
    "device and no figure here comes from a prospective study.",
    "Lateral views, CT, other body parts or modalities: never trained on them.",
    "Hospitals, scanners or populations not covered by the external evaluations below: internal "
    "test figures come from the same sources as training and overstate performance elsewhere.",
    "Reading a probability as a certainty: see the calibration error and the out-of-distribution "
    "figures.",
)

# Every figure the card names, in the order the Markdown gives them, with its label there.
FIGURES = {
    "training_data": "training data",
    "split_policy": "split policy",
    "internal_test": "internal test figures",
    "internal_test_intervals": "bootstrap intervals",
    "cross_validation": "cross-validation",
    "external_evaluations": "external evaluation",
    "shortcut_check": "shortcut check",
    "metadata_audit": "metadata-only audit",
    "calibration": "calibration error",
    "ood": "OOD AUROC",
    "operating_point": "operating point",
    "conformal": "conformal prediction sets",
    "gates": "gates",
    "version_pins": "version pins",
}


def missing(reason: str) -> dict:
    """A figure that was never measured, and why."""
    return {"missing": reason}


def is_missing(value) -> bool:
    return isinstance(value, dict) and set(value) == {"missing"}


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _pick(source: dict, key: str, where: str):
    """``source[key]``, or a missing figure naming the file that lacks it."""
    return source[key] if key in source else missing(f"missing ({where} has no {key})")


# ---- the run's data ---------------------------------------------------------------------------

def split_manifest_path(run_dir: Path, manifest: dict) -> Path | None:
    """The split manifest the model was trained on: the export's record, else the run config's."""
    from flannel.data.records import resolve_path

    config = _read_json(run_dir / "config.json") or {}
    recorded = manifest.get("split_manifest") or config.get("manifest")
    if not recorded:
        return None
    path = resolve_path(recorded, run_dir, Path.cwd())
    return path if path.is_file() else None


def _counts(rows, key: str, order: tuple = ()) -> dict:
    """Images per class within each value of ``key`` (a ManifestRow field), ``order`` first."""
    out: dict = defaultdict(Counter)
    for r in rows:
        out[getattr(r, key)][r.label] += 1
    keys = [k for k in order if k in out] + sorted(k for k in out if k not in order)
    return {k: dict(sorted(out[k].items())) for k in keys}


def _recorded(summary: dict | None, key: str):
    if summary is None:
        return missing(f"missing (no {SPLIT_SUMMARY_NAME} beside the split manifest)")
    return summary.get(key, missing(f"missing ({SPLIT_SUMMARY_NAME} has no {key})"))


def training_data(rows: list, summary: dict | None, manifest_path: Path) -> dict:
    """Images per class, per split x class and per source x class, and the folders read."""
    from flannel.data.records import SPLITS

    return {"split_manifest": str(manifest_path), "images": len(rows),
            "per_class": dict(sorted(Counter(r.label for r in rows).items())),
            "per_split": _counts(rows, "split", SPLITS), "per_source": _counts(rows, "source"),
            "source_folders": _recorded(summary, "sources"),
            "excluded_findings": _recorded(summary, "excluded_findings")}


def split_policy(rows: list, summary: dict | None) -> dict:
    """Patient-level split settings, patients, deduplication counts and patients that cross
    splits (recounted from the manifest)."""
    splits_of: dict = defaultdict(set)
    for r in rows:
        splits_of[r.patient_id].add(r.split)
    out = {"unit": "patient",
           "patients_in_several_splits": sum(len(s) > 1 for s in splits_of.values())}
    if summary is None:
        return {**out, "deduplication": _recorded(summary, "duplicates")}
    for key in ("seed", "fractions", "folds", "holdout_sources", "patients", "patients_per_split",
                "images_without_known_patient", "patient_note"):
        if key in summary:
            out[key] = summary[key]
    dup = summary.get("duplicates") or {}
    out["deduplication"] = (missing("not checked (--no-dedup)") if not dup.get("checked", True)
                            else {k: v for k, v in dup.items() if not isinstance(v, list)})
    return out


def metadata_audit(manifest_path: Path) -> dict:
    """The metadata-only audit's figures from ``audit.json`` beside the split manifest."""
    audit = _read_json(manifest_path.with_name(AUDIT_NAME))
    if audit is None:
        return missing(f"{NOT_RUN} (no {AUDIT_NAME} beside {manifest_path.name}: "
                       f"flannel data audit DATA_DIR --manifest {manifest_path} --json "
                       f"{manifest_path.with_name(AUDIT_NAME)})")
    s = audit.get("shortcut") or {}
    if "skipped" in s or "accuracy" not in s:
        return missing(f"skipped ({s.get('skipped', 'no figures recorded')})")
    keys = ("images", "accuracy", "chance", "majority_class", "per_class_auc", "warnings")
    return {"file": str(manifest_path.with_name(AUDIT_NAME)), **{k: s.get(k) for k in keys}}


# ---- the model's own figures ------------------------------------------------------------------

def member_runs(run_dir: Path, manifest: dict) -> dict[str, Path]:
    """Learner run folders by name: the run itself, or an ensemble's members."""
    if manifest.get("kind") != "ensemble":
        return {manifest.get("model_name") or run_dir.name: run_dir}
    return {m["name"]: Path(m["checkpoint"]).parent for m in manifest.get("members", [])}


def internal_test(run_dir: Path, kind: str) -> dict:
    """Test (else validation) figures of the served model from its run report."""
    if kind == "ensemble":
        report = _read_json(run_dir / "ensemble_report.json") or {}
        methods = report.get("methods") or {}
        split = "test" if "test" in methods else "val"
        fused = next((m for m in methods.get(split, []) if m.get("kind") == "flannel"), None)
        if fused is None:
            return missing("missing (ensemble_report.json has no FLANNEL figures)")
        return {"split": split, "method": fused["name"],
                "images": int(sum(map(sum, fused.get("confusion", [])))),
                **{k: fused.get(k) for k in ("accuracy", "macro_f1", "covid_recall",
                                             "per_class_f1")}}
    report = _read_json(run_dir / "report.json") or {}
    split = "test" if "test" in report else "val"
    m = report.get(split)
    if not m:
        return missing("missing (report.json has no test or validation figures)")
    return {"split": split, "images": m.get("n"), "accuracy": m.get("accuracy"),
            "macro_f1": m.get("macro_f1"), "per_class": m.get("per_class"),
            "roc_auc": m.get("roc_auc")}


def _cv_report(run_dir: Path) -> tuple[Path, dict] | None:
    """A cross-validation of this run's architecture on its manifest, in the run folder or a
    folder beside it."""
    config = _read_json(run_dir / "config.json") or {}
    if not config.get("manifest"):
        return None
    own = Path(config["manifest"]).resolve()
    for path in [run_dir / CV_REPORT_NAME, *sorted(run_dir.parent.glob(f"*/{CV_REPORT_NAME}"))]:
        report = _read_json(path)
        if report and report.get("arch") == config.get("arch") and \
                Path(report.get("manifest", "")).resolve() == own:
            return path, report
    return None


def cross_validation(runs: dict[str, Path]) -> dict:
    """Mean and sd over folds per learner, or "not run"."""
    out = {}
    for name, run in runs.items():
        found = _cv_report(run)
        out[name] = missing(NOT_RUN) if found is None else {
            "file": str(found[0]), "n_folds": found[1].get("n_folds"),
            "folds_run": len(found[1].get("per_fold", [])), "summary": found[1].get("summary")}
    return missing(NOT_RUN) if all(map(is_missing, out.values())) else out


def shortcut_check(runs: dict[str, Path]) -> dict:
    """The harmonised-image check's drops per learner, from each ``report.json``."""
    out = {}
    for name, run in runs.items():
        s = ((_read_json(run / "report.json") or {}).get("checks") or {}).get("shortcut")
        out[name] = missing(NOT_RUN) if not s else {
            "split": s.get("split"), **{k: s[k] for k in ("accuracy", "macro_f1") if k in s}}
    return missing(NOT_RUN) if all(map(is_missing, out.values())) else out


def external_reports(run_dir: str | Path,
                     checkpoint_sha256: str | None = None) -> dict[str, dict]:
    """Every external evaluation of this model (``RUN_DIR/external/<name>/report.json``).

    Args:
        run_dir: the learner run or ensemble folder.
        checkpoint_sha256: the served checkpoint's (the export manifest's); a report that names
            another checkpoint evaluated an earlier model and is left out.
    """
    root = Path(run_dir) / EXTERNAL_DIR
    reports = {p.parent.name: _read_json(p) for p in sorted(root.glob(f"*/{EXTERNAL_REPORT}"))}
    return {name: r for name, r in reports.items() if r and "metrics" in r
            and (not checkpoint_sha256 or r.get("checkpoint_sha256", checkpoint_sha256)
                 == checkpoint_sha256)}


def _external_figures(r: dict) -> dict:
    recalls = r.get("recall_summary") or {}
    ood = r.get("ood")
    return {"images": r.get("images"), "checkpoint_sha256": r.get("checkpoint_sha256"),
            "accuracy": r["metrics"].get("accuracy"), "macro_f1": r["metrics"].get("macro_f1"),
            "recall": recalls.get("recall"),
            "not_externally_validated": recalls.get("not_externally_validated"),
            "covid_normal_mean_recall": recalls.get("covid_normal_mean_recall"),
            "counts_by_source": r.get("counts_by_source"),
            "ood_pass_rate": ood.get("pass_rate") if isinstance(ood, dict) else missing(
                f"{NOT_RUN} ({r.get('ood_reason') or 'not in the report'})"),
            "calibration": r.get("calibration") or missing(NOT_RUN)}


def external_evaluations(run_dir: Path, checkpoint_sha256: str | None = None) -> dict:
    """Figures of each external evaluation, or the note that the archive was built without."""
    reports = external_reports(run_dir, checkpoint_sha256)
    return {name: _external_figures(r) for name, r in reports.items()} or missing(NO_EXTERNAL)


def unvalidated_refusal(run_dir: str | Path) -> str:
    """The one line that refuses to archive a model without an external evaluation."""
    return (f"refusing to archive {run_dir}: no external evaluation of this model in "
            f"{Path(run_dir) / EXTERNAL_DIR}/; run `flannel evaluate {run_dir} DIR ...` on "
            f"radiographs from another source, or pass {UNVALIDATED_FLAG}")


# ---- the export's figures ---------------------------------------------------------------------

def policy_path(run_dir: Path, manifest: dict) -> Path:
    """Where the export's answer policy is: its manifest entry, else its usual file name."""
    from flannel.artifacts import ManifestError, artifact_path, export_dir_of

    try:
        return artifact_path(export_dir_of(run_dir), manifest, ANSWER_POLICY)
    except ManifestError:
        return export_dir_of(run_dir) / POLICY_NAME


def _absent(key: str) -> dict:
    return missing(f"missing ({POLICY_NAME} has no {key})")


def _bootstrap(policy: dict) -> dict:
    """How the intervals were drawn (patient-level replicates and level)."""
    op = policy.get("operating_point") or {}
    return ((policy.get("test_figures") or {}).get("bootstrap") or op.get("bootstrap")
            or (op.get("test") or {}).get("bootstrap") or _absent("bootstrap settings"))


def _calibration(cal: dict) -> dict:
    figures = cal.get("figures") or {}
    return {**{k: cal[k] for k in ("kind", "temperature", "fitted_on", "in_graph") if k in cal},
            "figures": {s: figures.get(s) or _absent(f"calibration figures on {s}")
                        for s in CALIBRATION_SPLITS}}


def ood_sets(evaluation: dict) -> dict:
    """Each evaluation set's images, AUROC and pass rate (``evaluation["sets"]``, or the sets
    directly under ``evaluation``)."""
    sets = evaluation.get("sets", evaluation)
    return {name: e for name, e in sets.items() if isinstance(e, dict) and "auroc" in e}


def _ood(ood: dict) -> dict:
    sets = ood_sets(ood.get("evaluation") or {})
    return {**{k: ood[k] for k in ("method", "threshold", "val_pass_rate", "target_pass_rate")
               if k in ood},
            "sets": sets or _absent("OOD evaluation sets")}


def policy_figures(policy: dict | None) -> dict:
    """Bootstrap intervals, calibration, operating point, conformal sets and OOD figures from
    the export's answer policy; each one it lacks is named missing."""
    keys = ("internal_test_intervals", "calibration", "operating_point", "conformal", "ood")
    if policy is None:
        return {k: missing(NO_POLICY) for k in keys}
    tests, cal, ood = policy.get("test_figures"), policy.get("calibration"), policy.get("ood")
    return {
        "internal_test_intervals": ({**tests, "bootstrap": _bootstrap(policy)} if tests
                                    else _absent("test_figures")),
        "calibration": _calibration(cal) if cal else _absent("calibration"),
        "operating_point": policy.get("operating_point") or _absent("operating_point"),
        "conformal": policy.get("conformal") or _absent("conformal"),
        "ood": _ood(ood) if ood else _absent("ood"),
    }


def gates(manifest: dict, backend: str | None) -> dict:
    """The parity gate and each backend's gate as the export manifest records them."""
    backends = {e["backend"]: {"artifact": key, "gate": e.get("gate") or missing(NOT_RUN)}
                for key, e in manifest.get("artifacts", {}).items() if e.get("backend")}
    return {"served_backend": backend, "parity": manifest.get("parity") or missing(NOT_RUN),
            "backends": backends}


# ---- the card ---------------------------------------------------------------------------------

def collect_card(run_dir: str | Path, manifest: dict, *, model_name: str, model_version: str,
                 backend: str | None = None, export_manifest_sha256: str | None = None) -> dict:
    """Collect every figure the card names from the files that recorded them.

    Args:
        run_dir: the learner run or ensemble folder the archive is built from.
        manifest: its verified export manifest.
        model_name: the name the archive serves under.
        model_version: the archive's version.
        backend: the backend the archive serves with.
        export_manifest_sha256: sha256 of the export's manifest.json.

    Returns:
        The card as a JSON-able dict; every key of ``FIGURES`` is present, a figure never
        measured as ``{"missing": why}``.
    """
    from flannel.data.records import read_manifest

    run_dir = Path(run_dir)
    kind = manifest.get("kind", "learner")
    runs = member_runs(run_dir, manifest)
    card = {"format": CARD_FORMAT, "model_name": model_name, "model_version": str(model_version),
            "kind": kind, "served_backend": backend,
            "archived": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "run_dir": str(run_dir), "export_manifest_sha256": export_manifest_sha256,
            "intended_use": list(INTENDED_USE), "misuse": list(MISUSE),
            "classes": manifest.get("class_names", []),
            "members": [{k: m.get(k) for k in ("name", "arch", "checkpoint_sha256")}
                        for m in manifest.get("members", [])]}
    split_path = split_manifest_path(run_dir, manifest)
    if split_path is None:
        lost = missing("missing (the split manifest recorded by the export is not found)")
        card.update(training_data=lost, split_policy=lost, metadata_audit=lost)
    else:
        rows = read_manifest(split_path)
        summary = _read_json(split_path.with_name(SPLIT_SUMMARY_NAME))
        card.update(training_data=training_data(rows, summary, split_path),
                    split_policy=split_policy(rows, summary),
                    metadata_audit=metadata_audit(split_path))
    card.update(internal_test=internal_test(run_dir, kind), cross_validation=cross_validation(runs),
                external_evaluations=external_evaluations(run_dir,
                                                          manifest.get("checkpoint_sha256")),
                shortcut_check=shortcut_check(runs),
                **policy_figures(_read_json(policy_path(run_dir, manifest))),
                gates=gates(manifest, backend),
                version_pins={"pins": _pick(manifest, "pins", "manifest.json"),
                              "versions": _pick(manifest, "versions", "manifest.json")})
    return card


def write_card(card: dict, folder: str | Path) -> dict[str, Path]:
    """Write ``model_card.json`` and ``MODEL_CARD.md`` into ``folder``.

    Returns:
        The written files by their manifest artifact key (``CARD_ARTIFACTS``).
    """
    folder = Path(folder)
    texts = {CARD_JSON_ARTIFACT: json.dumps(card, indent=2) + "\n",
             CARD_MARKDOWN_ARTIFACT: card_markdown(card)}
    out = {}
    for key, text in texts.items():
        path = folder / CARD_ARTIFACTS[key]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
        out[key] = path
    return out


# ---- Markdown ---------------------------------------------------------------------------------

def _num(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "n/a" if value is None else str(value)


def _interval(fig) -> str:
    if not isinstance(fig, dict) or "value" not in fig:
        return _num(fig)
    return f"{_num(fig['value'])} [{_num(fig.get('low'))}, {_num(fig.get('high'))}]"


def _pairs(d: dict | None) -> str:
    return ", ".join(f"{k} {_num(v)}" for k, v in (d or {}).items()) or "none"


def _line(label: str, value, text) -> list[str]:
    """``- label: text(value)``, or ``- label: why it is missing``."""
    if is_missing(value):
        return [f"- {label}: {value['missing']}"]
    return [f"- {label}: {text(value)}"]


def _by_member(label: str, value, text) -> list[str]:
    if is_missing(value):
        return [f"- {label}: {value['missing']}"]
    return [line for name, v in value.items() for line in _line(f"{label} ({name})", v, text)]


def _data_lines(card: dict) -> list[str]:
    def data(d):
        return (f"{d['images']} images from {d['split_manifest']}; per class "
                f"{_pairs(d['per_class'])}"
                + "".join(f"; source {s}: {_pairs(c)}" for s, c in d["per_source"].items())
                + "".join(f"; {s}: {_pairs(c)}" for s, c in d["per_split"].items()))

    def policy(p):
        dedup = p["deduplication"]
        settings = "".join(f", {k} {p[k]}" for k in ("seed", "fractions", "folds", "patients")
                           if k in p)
        return (f"by {p['unit']}{settings}, {p['patients_in_several_splits']} patients in several "
                f"splits; deduplication: {dedup['missing'] if is_missing(dedup) else _pairs(dedup)}"
                + (f"; {p['patient_note']}" if p.get("patient_note") else ""))

    return (_line(FIGURES["training_data"], card["training_data"], data)
            + _line(FIGURES["split_policy"], card["split_policy"], policy))


def _test_lines(card: dict) -> list[str]:
    def point(t):
        per = t.get("per_class") or t.get("per_class_f1") or {}
        recall = {c: m.get("recall") if isinstance(m, dict) else m for c, m in per.items()}
        what = "recall" if t.get("per_class") else "F1"
        return (f"{t['split']} split, {t.get('images')} images: accuracy {_num(t.get('accuracy'))}"
                f", macro-F1 {_num(t.get('macro_f1'))}; per-class {what} {_pairs(recall)}")

    def intervals(t):
        per = t.get("per_class") or {}
        boot = t.get("bootstrap")
        how = ("" if is_missing(boot) or not boot else
               f" ({boot.get('replicates')} {boot.get('unit')}-level replicates, "
               f"level {boot.get('level')})")
        return (f"accuracy {_interval(t.get('accuracy'))}, macro-F1 {_interval(t.get('macro_f1'))}"
                + "".join(f"; {c} sensitivity {_interval(m.get('sensitivity'))}, specificity "
                          f"{_interval(m.get('specificity'))}" for c, m in per.items()) + how)

    def cv(c):
        s = c.get("summary") or {}
        return (f"{c.get('folds_run')} of {c.get('n_folds')} folds: "
                + ", ".join(f"{k} {_num(v.get('mean'))} ± {_num(v.get('sd'))}"
                            for k, v in s.items()))

    def external(e):
        ood = e.get("ood_pass_rate")
        return (f"{e.get('images')} images, accuracy {_num(e.get('accuracy'))}, macro-F1 "
                f"{_num(e.get('macro_f1'))}; recall {_pairs(e.get('recall'))}; not externally "
                f"validated: {', '.join(e.get('not_externally_validated') or []) or 'none'}; "
                f"OOD pass rate {ood['missing'] if is_missing(ood) else _num(ood)}")

    return (_line(FIGURES["internal_test"], card["internal_test"], point)
            + _line(FIGURES["internal_test_intervals"], card["internal_test_intervals"], intervals)
            + _by_member(FIGURES["cross_validation"], card["cross_validation"], cv)
            + _by_member(FIGURES["external_evaluations"], card["external_evaluations"], external))


def _shortcut_lines(card: dict) -> list[str]:
    def drop(s):
        return (f"{s.get('split')} split, harmonised images: accuracy drop "
                f"{_num((s.get('accuracy') or {}).get('drop'))}, macro-F1 drop "
                f"{_num((s.get('macro_f1') or {}).get('drop'))}")

    def audit(a):
        return (f"metadata alone predicts the class at accuracy {_num(a['accuracy'])} vs chance "
                f"{_num(a['chance'])}; one-vs-rest AUC {_pairs(a.get('per_class_auc'))}"
                + "".join(f"; WARNING {w}" for w in a.get("warnings") or []))

    return (_by_member(FIGURES["shortcut_check"], card["shortcut_check"], drop)
            + _line(FIGURES["metadata_audit"], card["metadata_audit"], audit))


def _answer_lines(card: dict) -> list[str]:
    def calibration(c):
        return (f"{c.get('kind')} T={_num(c.get('temperature'))}; ECE before -> after "
                + ", ".join(f"{split} {f['missing']}" if is_missing(f) else
                            f"{split} {_num((f.get('before') or {}).get('ece'))} -> "
                            f"{_num((f.get('after') or {}).get('ece'))}"
                            for split, f in c["figures"].items()))

    def ood(o):
        sets = o["sets"]
        auroc = sets["missing"] if is_missing(sets) else ", ".join(
            f"{name} {_num(e.get('auroc'))} ({e.get('images')} images)"
            for name, e in sets.items())
        return f"{o.get('method')}, threshold {_num(o.get('threshold'))}; AUROC {auroc}"

    def operating(o):
        test = o.get("test") or {}
        per_class = {c: m for c, m in test.get("per_class", test).items()
                     if isinstance(m, dict) and "sensitivity" in m}
        targets = [t if isinstance(t, str) else f"{t['class_name']}:{t['metric']}>={t['bound']}"
                   for t in o.get("targets") or []]
        return (f"targets {', '.join(targets) or 'none (argmax)'}; thresholds "
                f"{_pairs(o.get('thresholds'))}"
                + "".join(f"; test {c} sensitivity {_interval(m.get('sensitivity'))}, "
                          f"specificity {_interval(m.get('specificity'))}"
                          for c, m in per_class.items()))

    def conformal(c):
        test = c.get("test") or {}
        size = test.get("mean_size", test.get("mean_set_size"))
        return (f"coverage target {_num(c.get('coverage'))} (qhat {_num(c.get('qhat'))}, n "
                f"{c.get('n')}); test coverage {_num(test.get('coverage'))}, mean set size "
                f"{_num(size)}")

    return (_line(FIGURES["calibration"], card["calibration"], calibration)
            + _line(FIGURES["ood"], card["ood"], ood)
            + _line(FIGURES["operating_point"], card["operating_point"], operating)
            + _line(FIGURES["conformal"], card["conformal"], conformal))


def _gate_lines(card: dict) -> list[str]:
    g = card["gates"]
    parity = g["parity"]
    lines = [f"- {FIGURES['gates']}: serving {g['served_backend']}; parity "
             + (parity["missing"] if is_missing(parity) else
                f"{'passed' if parity.get('passed') else 'FAILED'} (max abs diff "
                f"{_num(parity.get('max_abs_diff'))})")]
    for name, gate in sorted(g["backends"].items()):
        state = (gate["gate"]["missing"] if is_missing(gate["gate"])
                 else "passed" if gate["gate"].get("passed") else "failed")
        lines.append(f"  - {name} ({gate['artifact']}): {state}"
                     + (" (served)" if name == g["served_backend"] else ""))
    pins = card["version_pins"]
    lines += _line(FIGURES["version_pins"], pins["pins"], _pairs)
    lines += _line("software versions", pins["versions"], _pairs)
    return lines


def card_markdown(card: dict) -> str:
    """The card as Markdown: every figure of ``FIGURES`` on a line, missing ones with why."""
    members = ", ".join(m["name"] for m in card["members"] if m.get("name")) or "-"
    head = [f"# Model card: {card['model_name']} {card['model_version']}", "",
            f"Model {card['model_name']}, version {card['model_version']}, {card['kind']} "
            f"({members}) served with {card['served_backend']}; archived {card['archived']} "
            f"from {card['run_dir']}.", "",
            "## Intended use", "", *(f"- {u}" for u in card["intended_use"]), "",
            "## Not for", "", *(f"- {u}" for u in card["misuse"]), "",
            "## Classes", "", ", ".join(card["classes"]), ""]
    sections = [("Data and split", _data_lines), ("Figures", _test_lines),
                ("Shortcuts", _shortcut_lines),
                ("Calibration, out-of-distribution inputs, operating point", _answer_lines),
                ("Gates and pins", _gate_lines)]
    body = [line for title, lines in sections for line in (f"## {title}", "", *lines(card), "")]
    return "\n".join(head + body)


# ---- reading a card back ----------------------------------------------------------------------

# A card and a manifest are a few kB; anything far larger in an archive is not one.
MAX_CARD_BYTES = 1 << 20


class CardError(RuntimeError):
    """No card where one was asked for, or a card that differs from its manifest entry."""


def read_card(where: str | Path, name: str = CARD_MARKDOWN) -> str:
    """A card file's text from a .mar, an export folder or a run folder.

    Args:
        where: a ``.mar`` (zip), an export folder (or unpacked archive) or a run folder holding
            ``export/``.
        name: ``MODEL_CARD.md`` or ``model_card.json``.

    Returns:
        The file's text, checked against the sha256 the archive's manifest lists for it; in an
        export folder, against the export manifest the card was written for.

    Raises:
        CardError: no card there, a card whose sha256 differs from the manifest's, or a card
            written for an earlier export.
    """
    from flannel.artifacts import MANIFEST_NAME, sha256_bytes

    where = Path(where)
    if where.is_file():
        read = partial(_from_zip, where)
    else:
        read = partial(_from_folder, where if (where / MANIFEST_NAME).is_file()
                       else where / "export")
    data, manifest = read(name), json.loads(read(MANIFEST_NAME, False) or "{}")
    key = next(k for k, v in CARD_ARTIFACTS.items() if v == name)
    entry = manifest.get("artifacts", {}).get(key)
    if entry is not None and entry.get("sha256") != sha256_bytes(data):
        raise CardError(f"{name} in {where} has sha256 {sha256_bytes(data)[:12]}, but its "
                        f"manifest lists {str(entry.get('sha256'))[:12]}: the card was changed")
    if entry is None and manifest:  # an export folder: the card must be of this export
        written_for = json.loads(read(CARD_JSON)).get("export_manifest_sha256")
        if written_for != sha256_bytes(read(MANIFEST_NAME)):
            raise CardError(f"the card in {where} was written for an earlier export; archive "
                            "it again (`flannel archive`) to write this export's card")
    return data.decode("utf-8")


def _from_folder(folder: Path, name: str, required: bool = True) -> bytes | None:
    if not (folder / name).is_file():
        if required:
            raise CardError(f"no {name} in {folder}: `flannel archive` writes it")
        return None
    return (folder / name).read_bytes()


def _from_zip(mar: Path, name: str, required: bool = True) -> bytes | None:
    import zipfile

    try:
        with zipfile.ZipFile(mar) as zf:
            info = zf.getinfo(name) if name in zf.namelist() else None
            if info is None:
                if required:
                    raise CardError(f"no {name} in {mar}: it was archived without a model card; "
                                    "archive it again")
                return None
            if info.file_size > MAX_CARD_BYTES:
                raise CardError(f"{name} in {mar} is {info.file_size} bytes, not a model card")
            return zf.read(info)
    except zipfile.BadZipFile as exc:
        raise CardError(f"{mar} is not a .mar archive ({exc})") from None
