"""The PACS bridge: new CR/DX instances from a DICOMweb server go to the served model, and each
answer goes back to the PACS as a Structured Report in the same study.

    flannel dicomweb --url http://pacs:8042/dicom-web --model resnet18 --since 20240101 --once

    from flannel.handlers.pacs_bridge import BridgeConfig, run_bridge
    summary = run_bridge(BridgeConfig(url=..., model="resnet18"), predict=my_predict)

Per instance: skipped when the state file or the PACS says it was answered already, or when it is
not a CR/DX image; otherwise fetched (any transfer syntax) into a private temporary folder,
sent to the model, its report stored (STOW-RS) and its outcome written to the state file in one
transaction, and its file deleted. Outcomes: answered, refused (the server's 4xx and reason),
failed (the PACS or the server gave no usable answer after retries; tried again next run),
skipped. Logs and reports name instances by SOP Instance UID only; any patient identifier of the
instance that a reason happens to quote is removed before it is written.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import sqlite3
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from flannel.handlers.dicomweb import DicomWebClient, DicomWebError, FoundInstance
from flannel.quoting import clip

log = logging.getLogger(__name__)

# What the bridge sends: chest radiographs (PS3.3 C.7.3.1 Modality) stored as images of the CR
# or DX SOP classes (PS3.4 B.5); other objects of those series (scanned forms, reports) are not.
MODALITIES = ("CR", "DX")
IMAGE_SOP_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.1",        # Computed Radiography Image Storage
    "1.2.840.10008.5.1.4.1.1.1.1",      # Digital X-Ray Image Storage - For Presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1",    # Digital X-Ray Image Storage - For Processing
})
# The DICOM object asked of the server for each answer: its Structured Report.
SR_KEY = "sr"
ANSWERED, REFUSED, FAILED, SKIPPED = "answered", "refused", "failed", "skipped"
ALREADY_REPORTED = "already reported in the PACS"
# Attributes whose values never reach a log line or a report (patient and visit identifiers).
IDENTIFYING_KEYWORDS = ("PatientName", "PatientID", "OtherPatientIDs", "PatientBirthDate",
                        "AccessionNumber", "InstitutionName", "InstitutionAddress",
                        "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName")
# Pieces of a name shorter than this are left in reasons: removing "A" or "Dr" would garble
# every message without hiding anyone.
MIN_IDENTIFIER_CHARS = 3
REMOVED = "[removed]"

# predict(files) -> one PredictResult-like answer per file, in order (the project's Client).
Predictor = Callable[[Sequence[str]], list]
# report_identity(dataset) -> (source SOP Instance UIDs, model name): what an SR answers.
Identify = Callable[[object], tuple[set, "str | None"]]


@dataclass(frozen=True)
class BridgeConfig:
    """What ``run_bridge`` does.

    Attributes:
        url: DICOMweb service root of the PACS.
        model: the served model's name (and the name reports of it carry).
        since: only studies dated YYYYMMDD or later.
        protocol: how the server is asked (``flannel.handlers.client.PROTOCOLS``).
        server_config: the server's config.properties (addresses and key file).
        state: the state file (SQLite) of instances already handled.
        poll_s: seconds between searches; None: one search, then stop.
        report: JSON lines (``.jsonl``/``.json``) or CSV (``.csv``) of every outcome.
        progress: show a progress bar.
        check_pacs: before sending, look for this model's reports already in the PACS (which
            a lost or new state file does not know of).
    """

    url: str
    model: str
    since: str | None = None
    protocol: str = "http"
    server_config: Path = Path("config.properties")
    state: Path = Path("dicomweb_state.sqlite")
    poll_s: float | None = None
    report: Path | None = None
    progress: bool = True
    check_pacs: bool = True


@dataclass
class Outcome:
    """What happened to one instance."""

    sop_instance_uid: str
    outcome: str
    status: int | None = None
    prediction: str | None = None
    reason: str = ""
    report_uid: str | None = None
    warning: str | None = None


@dataclass
class BridgeSummary:
    """Every outcome of a run (all polls), and the counts."""

    outcomes: list[Outcome] = field(default_factory=list)

    def count(self, outcome: str) -> int:
        return sum(o.outcome == outcome for o in self.outcomes)

    @property
    def sent(self) -> int:
        """Instances sent to the model (answered, refused, or failed at the server)."""
        return sum(o.status is not None for o in self.outcomes)

    def line(self) -> str:
        reasons: dict[str, int] = {}
        for o in self.outcomes:
            if o.outcome == SKIPPED:
                reasons[o.reason] = reasons.get(o.reason, 0) + 1
        skipped = ", ".join(f"{n} {why}" for why, n in sorted(reasons.items()))
        return (f"dicomweb: {len(self.outcomes)} instances, {self.count(ANSWERED)} answered, "
                f"{self.count(REFUSED)} refused, {self.count(FAILED)} failed, "
                f"{self.count(SKIPPED)} skipped" + (f" ({skipped})" if skipped else ""))


class BridgeState:
    """The state file: one row per instance with a final outcome, each written in its own
    transaction, so a crash loses at most the instance in flight."""

    def __init__(self, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))  # UIDs are not for others
        self._db = sqlite3.connect(path)
        with self._db:
            self._db.execute("CREATE TABLE IF NOT EXISTS instances (sop_instance_uid TEXT "
                             "PRIMARY KEY, outcome TEXT NOT NULL, status INTEGER, "
                             "report_uid TEXT, at REAL NOT NULL)")

    def done(self, uid: str) -> str | None:
        """The final outcome recorded for ``uid``, or None."""
        row = self._db.execute("SELECT outcome FROM instances WHERE sop_instance_uid = ?",
                               (uid,)).fetchone()
        return row[0] if row else None

    def record(self, outcome: Outcome) -> None:
        """Remember ``outcome``: that instance is never sent again."""
        with self._db:
            self._db.execute("INSERT OR REPLACE INTO instances VALUES (?, ?, ?, ?, ?)",
                             (outcome.sop_instance_uid, outcome.outcome, outcome.status,
                              outcome.report_uid, time.time()))

    def close(self) -> None:
        self._db.close()


def identifiers(path: Path) -> list[str]:
    """The patient and visit identifiers in a DICOM file, and the longer pieces of its names:
    what must never be written out."""
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(IDENTIFYING_KEYWORDS))
    values: set[str] = set()
    for keyword in IDENTIFYING_KEYWORDS:
        value = ds.get(keyword)
        for item in (value if isinstance(value, pydicom.multival.MultiValue) else [value]):
            text = str(item or "").strip()
            values.update([text, *text.replace("^", " ").split()])
    return sorted((v for v in values if len(v) >= MIN_IDENTIFIER_CHARS), key=len, reverse=True)


def redact(text: str, secrets: Sequence[str]) -> str:
    """``text`` without any of ``secrets`` (longest first), escaped and clipped."""
    for secret in secrets:
        text = text.replace(secret, REMOVED)
    return clip(text, 200)


def existing_reports(pacs: DicomWebClient, study: str, identify: Identify) -> set[tuple]:
    """(source SOP Instance UID, model name) of every SR in ``study``."""
    import pydicom

    answered = set()
    for sr in pacs.search_instances("SR", study=study):
        ds = pydicom.Dataset.from_json(pacs.metadata(sr.study, sr.series, sr.sop_instance_uid),
                                       bulk_data_uri_handler=lambda *_: b"")
        sources, model = identify(ds)
        answered.update((uid, model) for uid in sources)
    return answered


def server_warnings(result) -> list[str]:
    """The answer's doubts about its input (a plain answer's ``warnings``, a v2 output's)."""
    body = result.body or {}
    found = body.get("warnings")
    if found is None:
        found = next((o.get("data") for o in body.get("outputs") or []
                      if isinstance(o, dict) and o.get("name") == "warnings"), None)
    return [str(w) for w in found] if isinstance(found, list) else []


def server_reason(result) -> str:
    """The server's reason for a refusal (its JSON error or message, else its text)."""
    return result.summary().split("\t", 3)[-1]


class Bridge:
    """One PACS, one model, one state file; ``handle`` gives each instance's outcome."""

    def __init__(self, config: BridgeConfig, pacs: DicomWebClient, predict: Predictor,
                 state: BridgeState, identify: Identify | None, workdir: Path) -> None:
        self.config, self.pacs, self.predict, self.state = config, pacs, predict, state
        self.identify, self.workdir = identify, workdir
        self._reported: dict[str, set[tuple]] = {}
        # Instances this process has handled for good: a later poll passes over them quietly.
        self.seen: set[str] = set()

    def find(self) -> list[FoundInstance]:
        """Every CR/DX instance since ``config.since`` not handled yet by this process, once."""
        found = {}
        for modality in MODALITIES:
            for item in self.pacs.search_instances(modality, since=self.config.since):
                if item.sop_instance_uid not in self.seen:
                    found.setdefault(item.sop_instance_uid, item)
        return list(found.values())

    def skip_reason(self, item: FoundInstance) -> str | None:
        if item.modality not in MODALITIES:
            return f"not CR/DX: {clip(str(item.modality), 16)}"
        if item.sop_class_uid not in IMAGE_SOP_CLASSES:
            return "not a CR/DX image"
        done = self.state.done(item.sop_instance_uid)
        if done:
            return f"{done} in an earlier run"
        if self._already_reported(item):
            return ALREADY_REPORTED
        return None

    def _already_reported(self, item: FoundInstance) -> bool:
        if self.identify is None:
            return False
        if item.study not in self._reported:
            self._reported[item.study] = existing_reports(self.pacs, item.study, self.identify)
        reported = self._reported[item.study]
        return ((item.sop_instance_uid, self.config.model) in reported
                or (item.sop_instance_uid, None) in reported)

    def handle(self, item: FoundInstance) -> Outcome:
        """The instance's outcome; answers, refusals and reports found in the PACS are in the
        state file before this returns."""
        uid = item.sop_instance_uid
        path = self.workdir / "instance.dcm"  # one at a time; no name from the PACS
        secrets: list[str] = []  # the instance's identifiers, once its file is read
        try:
            why = self.skip_reason(item)
            outcome = Outcome(uid, SKIPPED, reason=why) if why else self._send(item, path,
                                                                              secrets)
        except Exception as exc:  # the boundary: one instance's failure is its own
            # An exception's text may quote the file (a decoder's, a reader's): redacted too.
            outcome = Outcome(uid, FAILED, reason=redact(f"{type(exc).__name__}: {exc}",
                                                         secrets))
        finally:
            path.unlink(missing_ok=True)
        if outcome.outcome in (ANSWERED, REFUSED) or outcome.reason == ALREADY_REPORTED:
            self.state.record(outcome)
        if outcome.outcome != FAILED:
            self.seen.add(uid)
        return outcome

    def _send(self, item: FoundInstance, path: Path, secrets: list[str]) -> Outcome:
        """Fetch, ask and store one instance; ``secrets`` gets its identifiers first."""
        uid = item.sop_instance_uid
        data = self.pacs.retrieve(item.study, item.series, uid)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        secrets.extend(identifiers(path))
        (result,) = self.predict([str(path)])
        warning = "; ".join(server_warnings(result))
        if not result.ok:
            kind = REFUSED if 400 <= result.status < 500 else FAILED
            return Outcome(uid, kind, result.status, reason=redact(server_reason(result), secrets))
        sr = (getattr(result, "dicom_objects", None) or {}).get(SR_KEY)
        if not sr:
            return Outcome(uid, FAILED, result.status, result.prediction,
                           "the server answered without a Structured Report")
        self.pacs.store([sr])
        report_uid = sop_instance_uid(sr)
        self._reported.setdefault(item.study, set()).add((uid, self.config.model))
        return Outcome(uid, ANSWERED, result.status, result.prediction, report_uid=report_uid,
                       warning=redact(warning, secrets) if warning else None)


def sop_instance_uid(part10: bytes) -> str | None:
    """The SOP Instance UID of a DICOM Part 10 file's bytes."""
    import io

    import pydicom

    ds = pydicom.dcmread(io.BytesIO(part10), stop_before_pixels=True,
                         specific_tags=["SOPInstanceUID"])
    return str(ds.get("SOPInstanceUID") or "") or None


def write_report(outcomes: list[Outcome], path: Path) -> None:
    """Every outcome, as CSV for a ``.csv`` path, else as JSON lines."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [asdict(o) for o in outcomes]
    with path.open("w", newline="") as out:
        if path.suffix.lower() == ".csv":
            writer = csv.DictWriter(out, fieldnames=list(Outcome.__dataclass_fields__))
            writer.writeheader()
            writer.writerows(rows)
        else:
            out.writelines(json.dumps(row) + "\n" for row in rows)


def default_identify() -> Identify:
    """``flannel.dicom_results.report_identity``: what the reports of this project answer."""
    from flannel.dicom_results import report_identity

    return report_identity


def run_pass(bridge: Bridge, stop: threading.Event, progress: bool) -> list[Outcome]:
    """One search and every instance it found, until ``stop`` is set (then the instance in
    flight is finished)."""
    from tqdm import tqdm

    found = bridge.find()
    outcomes = []
    for item in tqdm(found, desc="dicomweb", unit="instance", disable=not progress,
                     mininterval=1):
        if stop.is_set():
            break
        outcome = bridge.handle(item)
        outcomes.append(outcome)
        if outcome.outcome in (REFUSED, FAILED):
            log.warning("%s %s: %s %s", outcome.sop_instance_uid, outcome.outcome,
                        outcome.status or "", outcome.reason)
        else:
            log.debug("%s %s", outcome.sop_instance_uid, outcome.reason or outcome.outcome)
    return outcomes


def run_bridge(config: BridgeConfig, predict: Predictor, pacs: DicomWebClient | None = None,
               identify: Identify | None = None, stop: threading.Event | None = None
               ) -> BridgeSummary:
    """Search, send and store once, or every ``config.poll_s`` seconds until ``stop`` is set.

    Args:
        config: the PACS, model, state file and report.
        predict: ``predict(files) -> [PredictResult]``, each result carrying the report in
            ``dicom_objects["sr"]`` (``Client.predict(..., dicom_out="sr")``).
        pacs: the DICOMweb client (default: one for ``config.url``).
        identify: reads an SR's sources and model (default: ``default_identify()``).
        stop: set it (a signal handler does) to end after the instance in flight.

    Returns:
        Every outcome; the report file, when asked for, holds the same.
    """
    pacs = pacs or DicomWebClient(config.url)
    identify = (identify or default_identify()) if config.check_pacs else None
    from flannel.dicom_bounds import keep_identifiers_out_of_logs

    keep_identifiers_out_of_logs()
    stop = stop or threading.Event()
    summary = BridgeSummary()
    state = BridgeState(config.state)
    workdir = Path(tempfile.mkdtemp(prefix="flannel-dicomweb-"))  # 0700: patient data
    try:
        bridge = Bridge(config, pacs, predict, state, identify, workdir)
        while not stop.is_set():
            try:
                summary.outcomes += run_pass(bridge, stop, config.progress)
            except DicomWebError as exc:
                if config.poll_s is None:
                    raise
                log.warning("PACS search failed: %s; searching again in %s s", exc, config.poll_s)
            if config.poll_s is None or stop.wait(config.poll_s):
                break
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        state.close()
        if config.report is not None:
            write_report(summary.outcomes, config.report)
    return summary
