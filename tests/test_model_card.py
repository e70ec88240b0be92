"""The model card: every figure named (measured ones equal to the files that recorded them, the
rest as missing), the archive's refusal without an external evaluation, `flannel card`, and a
changed card refused at load.

    .venv/bin/pytest tests/test_model_card.py -q
"""
from __future__ import annotations

import json
import shutil
import zipfile
from collections import Counter
from pathlib import Path

import pytest
import yaml

from flannel.cli import main as flannel_main
from flannel.data.dedup import DuplicateReport
from flannel.data.records import ManifestRow
from flannel.data.split import split_summary, write_split
from flannel.model_card import (AUDIT_NAME, CARD_JSON, CARD_MARKDOWN, CV_REPORT_NAME, FIGURES,
                                NO_EXTERNAL, NO_POLICY, POLICY_NAME, CardError, card_markdown,
                                collect_card, external_reports, is_missing, read_card,
                                unvalidated_refusal)

CLASSES = ["COVID-19", "Normal", "Pneumonia"]
SHA = "a" * 64


def _rows(root: Path) -> list[ManifestRow]:
    """12 images from two sources, one patient each, over three splits."""
    rows = []
    for i in range(12):
        source = "radiography" if i % 3 else "hannover"
        split = ("train", "train", "val", "test")[i % 4]
        rows.append(ManifestRow(str(root / f"{i}.png"), CLASSES[i % 3], CLASSES[i % 3], source,
                                f"{source}:p{i}", source == "hannover", split))
    return rows


def _write_json(path: Path, data: dict) -> dict:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return data


def _per_class(value: float) -> dict:
    return {c: {"sensitivity": {"value": value, "low": value - 0.1, "high": value + 0.05},
                "specificity": {"value": 0.9, "low": 0.8, "high": 0.95}} for c in CLASSES}


POLICY = {
    "format": 1,
    "calibration": {"kind": "temperature", "temperature": 1.7, "in_graph": True, "figures": {
        "val": {"before": {"ece": 0.12, "brier": 0.3, "nll": 0.7},
                "after": {"ece": 0.04, "brier": 0.28, "nll": 0.6}},
        "test": {"before": {"ece": 0.15, "brier": 0.31, "nll": 0.72},
                 "after": {"ece": 0.06, "brier": 0.29, "nll": 0.62}}}},
    "operating_point": {"targets": ["COVID-19:sensitivity>=0.95"],
                        "thresholds": {"COVID-19": 0.21, "Normal": 0.5, "Pneumonia": 0.5},
                        "test": {"per_class": _per_class(0.96),
                                 "bootstrap": {"replicates": 2000, "level": 0.95,
                                               "unit": "patient"}}},
    "conformal": {"score": "lac", "coverage": 0.9, "qhat": 0.83, "n": 36,
                  "test": {"coverage": 0.92, "mean_size": 1.3}},
    "ood": {"method": "mahalanobis", "threshold": 12.5, "val_pass_rate": 0.95,
            "target_pass_rate": 0.95,
            "evaluation": {"threshold": 1.0, "sets": {
                "photographs": {"images": 15, "auroc": 0.99, "pass_rate": 0.0},
                "ct": {"images": 12, "auroc": 0.87, "pass_rate": 0.25}}}},
    "test_figures": {"accuracy": 0.83, "macro_f1": 0.81, "per_class": _per_class(0.8),
                     "bootstrap": {"replicates": 2000, "level": 0.95, "unit": "patient"}},
}


def _learner_report(shortcut: bool = True) -> dict:
    test = {"accuracy": 0.83, "macro_f1": 0.81, "n": 3, "roc_auc": {c: 0.9 for c in CLASSES},
            "per_class": {c: {"precision": 0.8, "recall": 0.7, "f1": 0.75, "support": 1}
                          for c in CLASSES}}
    checks = {"shortcut": {"split": "test",
                           "accuracy": {"main": 0.83, "harmonised": 0.5, "drop": 0.33},
                           "macro_f1": {"main": 0.81, "harmonised": 0.4, "drop": 0.41}}}
    return {"arch": "resnet18", "test": test, **({"checks": checks} if shortcut else {})}


def _manifest(run: Path, split_manifest: Path, kind: str = "learner", members=None) -> dict:
    return {"kind": kind, "model_name": run.name, "class_names": CLASSES,
            "checkpoint_sha256": SHA, "split_manifest": str(split_manifest),
            "members": members or [{"name": run.name, "arch": "resnet18",
                                    "checkpoint": str(run / "best.pt"), "checkpoint_sha256": SHA}],
            "parity": {"passed": True, "max_abs_diff": 1.2e-7, "report": "parity.json"},
            "artifacts": {"onnx_fp32": {"backend": "ort-fp32",
                                        "gate": {"name": "parity", "passed": True}},
                          "onnx_int8": {"backend": "ort-int8",
                                        "gate": {"passed": False, "argmax_agreement": 0.94}},
                          "input_spec": {"path": "input_spec.json"}},
            "pins": {"flannel_version": "0.1.0", "reference_tensor_sha256": "b" * 64},
            "versions": {"torch": "2.15.0", "onnxruntime": "1.31.1"}}


@pytest.fixture
def learner_run(tmp_path) -> dict:
    """A learner run folder with every file the card reads, each written as its stage writes it,
    and the export manifest; returns the sources by name."""
    data = tmp_path / "data"
    rows = _rows(data)
    dup = DuplicateReport(exact_groups=[["a", "b"]], near_groups=[["c", "d"], ["e", "f"]],
                          changed=3, merged_patients=2)
    summary = split_summary(rows, "3class", duplicates=dup, seed=1, fractions=[0.8, 0.1, 0.1],
                            folds=0, holdout_sources=[])
    write_split(rows, data / "manifest.csv", summary)
    run = tmp_path / "resnet18"
    config = _write_json(run / "config.json", {"arch": "resnet18", "scheme": "3class",
                                               "manifest": str(data / "manifest.csv")})
    cv = _write_json(tmp_path / "cv" / CV_REPORT_NAME, {
        "arch": "resnet18", "manifest": config["manifest"], "n_folds": 5,
        "per_fold": [{"fold": k} for k in range(5)],
        "summary": {"accuracy": {"mean": 0.74, "sd": 0.02}, "macro_f1": {"mean": 0.7, "sd": 0.03},
                    "covid_recall": {"mean": 0.8, "sd": 0.05}}})
    external = {"name": "site-a", "checkpoint_sha256": SHA, "images": 40,
                "metrics": {"accuracy": 0.55, "macro_f1": 0.5},
                "recall_summary": {"recall": {"COVID-19": 0.7, "Normal": 0.09},
                                   "not_externally_validated": ["Pneumonia"],
                                   "covid_normal_mean_recall": 0.395},
                "counts_by_source": {"hannover": {"COVID-19": 20}, "openist": {"Normal": 20}},
                "ood": {"pass_rate": 0.9, "images": 40}, "calibration": {"external": {}}}
    sources = {
        "rows": rows, "summary": summary, "cv": cv, "run": run,
        "report": _write_json(run / "report.json", _learner_report()),
        "audit": _write_json(data / AUDIT_NAME, {"shortcut": {
            "images": 12, "accuracy": 0.85, "chance": 0.45, "majority_class": "Pneumonia",
            "per_class_auc": {"COVID-19": 0.96}, "warnings": ["metadata alone predicts"]}}),
        "external": _write_json(run / "external" / "site-a" / "report.json", external),
        "policy": _write_json(run / "export" / POLICY_NAME, POLICY),
        "manifest": _manifest(run, data / "manifest.csv"),
    }
    # An evaluation of an earlier checkpoint of this run is not one of this model.
    _write_json(run / "external" / "old" / "report.json",
                {**external, "checkpoint_sha256": "c" * 64})
    return sources


def _card(run: Path, manifest: dict) -> dict:
    return collect_card(run, manifest, model_name="chest", model_version="3.2", backend="ort-fp32")


def test_card_gives_every_figure_as_its_source_recorded_it(learner_run):
    s = learner_run
    card = _card(s["run"], s["manifest"])
    assert (card["model_name"], card["model_version"], card["classes"]) == ("chest", "3.2", CLASSES)
    assert set(FIGURES) <= set(card) and not any(is_missing(card[k]) for k in FIGURES)
    data = card["training_data"]
    assert data["images"] == 12 and data["per_class"] == dict(Counter(r.label for r in s["rows"]))
    assert data["per_source"] == {
        src: dict(Counter(r.label for r in s["rows"] if r.source == src))
        for src in ("hannover", "radiography")}
    assert data["per_split"]["train"] == s["summary"]["counts"]["train"]
    policy = card["split_policy"]
    assert policy["unit"] == "patient" and policy["patients_in_several_splits"] == 0
    assert policy["deduplication"] == {"exact_groups": 1, "near_groups": 2,
                                       "images_changed_patient": 3, "patients_merged": 2,
                                       "max_phash_distance": 10}
    assert (policy["seed"], policy["patients"]) == (1, 12)
    test = s["report"]["test"]
    assert card["internal_test"]["accuracy"] == test["accuracy"]
    assert card["internal_test"]["per_class"] == test["per_class"]
    intervals = card["internal_test_intervals"]
    assert intervals["per_class"] == POLICY["test_figures"]["per_class"]
    assert intervals["bootstrap"] == POLICY["test_figures"]["bootstrap"]
    assert card["cross_validation"]["resnet18"]["summary"] == s["cv"]["summary"]
    assert list(card["external_evaluations"]) == ["site-a"]
    ext = card["external_evaluations"]["site-a"]
    assert (ext["accuracy"], ext["recall"], ext["ood_pass_rate"]) == (
        0.55, s["external"]["recall_summary"]["recall"], 0.9)
    assert card["shortcut_check"]["resnet18"]["accuracy"] == \
        s["report"]["checks"]["shortcut"]["accuracy"]
    assert card["metadata_audit"]["accuracy"] == s["audit"]["shortcut"]["accuracy"]
    assert card["calibration"]["figures"] == POLICY["calibration"]["figures"]
    assert card["calibration"]["temperature"] == 1.7
    assert card["ood"]["sets"] == POLICY["ood"]["evaluation"]["sets"]
    assert card["operating_point"] == POLICY["operating_point"]
    assert card["conformal"] == POLICY["conformal"]
    gates = card["gates"]
    assert gates["served_backend"] == "ort-fp32" and gates["parity"]["passed"] is True
    assert gates["backends"]["ort-int8"] == {"artifact": "onnx_int8",
                                             "gate": {"passed": False, "argmax_agreement": 0.94}}
    assert card["version_pins"] == {"pins": s["manifest"]["pins"],
                                    "versions": s["manifest"]["versions"]}
    json.dumps(card)  # JSON as it stands


def test_markdown_names_every_figure_with_its_values(learner_run):
    md = card_markdown(_card(learner_run["run"], learner_run["manifest"]))
    for label in FIGURES.values():
        assert f"- {label}" in md, label
    assert "# Model card: chest 3.2" in md
    for text in ("external evaluation (site-a): 40 images, accuracy 0.5500",
                 "not externally validated: Pneumonia", "cross-validation (resnet18): 5 of 5 "
                 "folds: accuracy 0.7400 ± 0.0200", "accuracy drop 0.3300, macro-F1 drop 0.4100",
                 "ECE before -> after val 0.1200 -> 0.0400, test 0.1500 -> 0.0600",
                 "photographs 0.9900 (15 images), ct 0.8700 (12 images)",
                 "COVID-19 sensitivity 0.9600 [0.8600, 1.0100]", "vs chance 0.4500",
                 "ort-int8 (onnx_int8): failed", "ort-fp32 (onnx_fp32): passed (served)",
                 "source hannover: COVID-19 4", "exact_groups 1, near_groups 2"):
        assert text in md, text
    assert "external evaluation (old)" not in md


def test_a_figure_never_measured_is_named_missing(tmp_path):
    run = tmp_path / "bare"
    _write_json(run / "config.json", {"arch": "resnet18"})
    manifest = {"kind": "learner", "model_name": "bare", "class_names": CLASSES,
                "members": [], "artifacts": {}}
    card = _card(run, manifest)
    measured_elsewhere = {"gates", "version_pins"}
    for key in set(FIGURES) - measured_elsewhere:
        assert is_missing(card[key]), key
    assert is_missing(card["gates"]["parity"])
    assert is_missing(card["version_pins"]["pins"]) and is_missing(card["version_pins"]["versions"])
    assert card["cross_validation"] == {"missing": "not run"}
    assert card["external_evaluations"] == {"missing": NO_EXTERNAL}
    assert card["calibration"] == {"missing": NO_POLICY}
    md = card_markdown(card)
    for line in ("- cross-validation: not run",
                 "- external evaluation: none (built with --allow-unvalidated)",
                 f"- calibration error: {NO_POLICY}", f"- OOD AUROC: {NO_POLICY}",
                 f"- operating point: {NO_POLICY}", f"- bootstrap intervals: {NO_POLICY}",
                 "- shortcut check: not run", "- metadata-only audit: missing"):
        assert line in md, line


def test_a_partial_answer_policy_names_what_it_lacks(learner_run):
    s = learner_run
    val = POLICY["calibration"]["figures"]["val"]
    partial = {"format": 1, "calibration": {"kind": "temperature", "temperature": 1.2,
                                            "figures": {"val": val}}}
    _write_json(s["run"] / "export" / POLICY_NAME, partial)
    card = _card(s["run"], s["manifest"])
    assert card["calibration"]["figures"]["val"] == val
    assert is_missing(card["calibration"]["figures"]["test"])
    for key in ("ood", "operating_point", "conformal", "internal_test_intervals"):
        assert card[key] == {"missing": f"missing ({POLICY_NAME} has no "
                                        f"{'test_figures' if key.startswith('internal') else key})"}
    md = card_markdown(card)
    assert "test missing (answer_policy.json has no calibration figures on test)" in md


def test_an_ensemble_card_says_which_member_each_figure_belongs_to(learner_run, tmp_path):
    s = learner_run
    other = tmp_path / "squeezenet1_1"
    _write_json(other / "config.json", {"arch": "squeezenet1_1", "manifest": "elsewhere.csv"})
    _write_json(other / "report.json", _learner_report(shortcut=False))
    ensemble = tmp_path / "ensemble"
    fused = {"name": "FLANNEL (gamma 2)", "kind": "flannel", "accuracy": 0.9, "macro_f1": 0.88,
             "covid_recall": 0.95, "per_class_f1": {c: 0.88 for c in CLASSES},
             "confusion": [[4, 0, 0], [0, 4, 1], [0, 0, 3]]}
    _write_json(ensemble / "ensemble_report.json", {"methods": {"test": [
        {"name": "resnet18", "kind": "learner", "accuracy": 0.5}, fused]}})
    members = [{"name": n, "arch": n, "checkpoint": str(d / "best.pt"), "checkpoint_sha256": SHA}
               for n, d in (("resnet18", s["run"]), ("squeezenet1_1", other))]
    card = _card(ensemble, _manifest(ensemble, Path(s["manifest"]["split_manifest"]), "ensemble",
                                     members))
    assert card["kind"] == "ensemble"
    assert card["internal_test"]["accuracy"] == 0.9 and card["internal_test"]["images"] == 12
    assert card["internal_test"]["method"] == fused["name"]
    assert card["shortcut_check"]["resnet18"]["macro_f1"]["drop"] == 0.41
    assert card["shortcut_check"]["squeezenet1_1"] == {"missing": "not run"}
    assert card["cross_validation"]["squeezenet1_1"] == {"missing": "not run"}
    assert card["external_evaluations"] == {"missing": NO_EXTERNAL}  # members' are not its own
    md = card_markdown(card)
    assert "- shortcut check (resnet18): test split" in md
    assert "- shortcut check (squeezenet1_1): not run" in md
    assert "- cross-validation (resnet18): 5 of 5 folds" in md


def test_only_evaluations_of_the_served_checkpoint_count(learner_run):
    run = learner_run["run"]
    assert set(external_reports(run)) == {"old", "site-a"}
    assert set(external_reports(run, SHA)) == {"site-a"}
    assert external_reports(run, "d" * 64) == {}
    line = unvalidated_refusal(run)
    assert "\n" not in line and f"flannel evaluate {run} DIR ..." in line
    assert "--allow-unvalidated" in line


# ---- the card inside a real archive --------------------------------------------------------

@pytest.fixture(scope="module")
def archived(exported_tiny_run, tmp_path_factory) -> tuple[Path, Path, Path]:
    """(run, .mar, trust list): the tiny run, parity-checked, externally evaluated, archived."""
    from flannel.export.parity import run_parity
    from flannel.handlers.archive import ArchiveSettings, build_archive

    root = tmp_path_factory.mktemp("card")
    run = shutil.copytree(exported_tiny_run, root / "run")
    run_parity(run)
    trust = root / "trust.json"
    mar = build_archive(run, root / "store", version="4.2", trust_list=trust,
                        settings=ArchiveSettings(batch_size=2, workers=1))
    return run, mar, trust


@pytest.mark.slow
def test_the_archive_carries_the_card_in_its_served_manifest(archived):
    from flannel.artifacts import sha256_bytes

    run, mar, _ = archived
    with zipfile.ZipFile(mar) as zf:
        served = json.loads(zf.read("manifest.json"))["artifacts"]
        files = {name: zf.read(name) for name in (CARD_JSON, CARD_MARKDOWN)}
        config = yaml.safe_load(zf.read("model-config.yaml"))
    assert served["model_card"]["path"] == CARD_JSON
    assert served["model_card_markdown"]["path"] == CARD_MARKDOWN
    for key, name in (("model_card", CARD_JSON), ("model_card_markdown", CARD_MARKDOWN)):
        assert served[key]["sha256"] == sha256_bytes(files[name])
        assert (run / "export" / name).read_bytes() == files[name]
    card = json.loads(files[CARD_JSON])
    assert (card["model_name"], card["model_version"]) == ("resnet18", "4.2")
    assert card["served_backend"] == config["handler"]["backend"]
    report = json.loads((run / "external" / "toy-external" / "report.json").read_text())
    assert card["external_evaluations"]["toy-external"]["accuracy"] == \
        report["metrics"]["accuracy"]
    assert files[CARD_MARKDOWN].decode() == card_markdown(card)


@pytest.mark.slow
def test_flannel_card_prints_the_card_from_an_archive_or_a_folder(archived, tmp_path, capsys):
    run, mar, _ = archived
    with zipfile.ZipFile(mar) as zf:
        markdown, card = zf.read(CARD_MARKDOWN).decode(), json.loads(zf.read(CARD_JSON))
    assert flannel_main(["card", str(mar)]) == 0
    assert capsys.readouterr().out == markdown
    assert flannel_main(["card", str(mar), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == card
    for where in (run, run / "export"):
        assert flannel_main(["card", str(where)]) == 0
        assert capsys.readouterr().out == markdown
    assert flannel_main(["card", str(tmp_path)]) == 2
    assert "flannel archive" in capsys.readouterr().err
    export = tmp_path / "export"
    export.mkdir()
    for name in ("manifest.json", CARD_JSON, CARD_MARKDOWN):
        shutil.copy(run / "export" / name, export / name)
    assert read_card(export) == markdown
    (export / "manifest.json").write_text((export / "manifest.json").read_text() + " ")
    assert flannel_main(["card", str(tmp_path)]) == 2  # the export changed after archiving
    assert "written for an earlier export" in capsys.readouterr().err


@pytest.mark.slow
def test_archive_refuses_an_unvalidated_model_in_one_line_unless_allowed(archived, tmp_path,
                                                                         capsys):
    from flannel.handlers.archive import ArchiveError, build_archive

    run = shutil.copytree(archived[0], tmp_path / "run")
    shutil.rmtree(run / "external")
    store, trust = tmp_path / "store", tmp_path / "trust.json"
    with pytest.raises(ArchiveError) as refused:
        build_archive(run, store, trust_list=trust)
    assert str(refused.value) == unvalidated_refusal(run)
    assert not store.exists() or not list(store.glob("*.mar"))
    args = ["archive", str(run), "--model-store", str(store), "--trust-list", str(trust)]
    assert flannel_main(args) == 2
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "flannel evaluate" in out
    assert flannel_main([*args, "--allow-unvalidated"]) == 0
    capsys.readouterr()
    card = json.loads(read_card(store / "resnet18.mar", CARD_JSON))
    assert card["external_evaluations"] == {"missing": NO_EXTERNAL}
    assert "- external evaluation: none (built with --allow-unvalidated)" in \
        read_card(store / "resnet18.mar")


@pytest.mark.slow
def test_a_changed_card_is_refused_at_load_and_by_flannel_card(archived, tmp_path):
    from flannel.artifacts import ManifestError
    from flannel.handlers.serving import load_served_model
    from flannel.handlers.trust import TrustedArchive, TrustError
    from test_trust import rewrite_mar

    _, mar, trust = archived
    model_dir = tmp_path / "model"
    with zipfile.ZipFile(mar) as zf:
        zf.extractall(model_dir)
    handler = yaml.safe_load((model_dir / "model-config.yaml").read_text())["handler"]
    load_served_model(model_dir, handler)  # as archived, it loads
    TrustedArchive(model_dir, trust)
    card = model_dir / CARD_MARKDOWN
    card.write_text(card.read_text().replace("external evaluation (toy-external)",
                                             "external evaluation (a famous hospital)"))
    with pytest.raises(ManifestError, match="model_card_markdown.*sha256"):
        load_served_model(model_dir, handler)
    with pytest.raises(TrustError, match=CARD_MARKDOWN):
        TrustedArchive(model_dir, trust)
    forged = rewrite_mar(mar, tmp_path / "forged.mar", {CARD_JSON: b'{"model_version": "9"}'})
    with pytest.raises(CardError, match="changed"):
        read_card(forged, CARD_JSON)
    assert flannel_main(["card", str(forged), "--json"]) == 2
