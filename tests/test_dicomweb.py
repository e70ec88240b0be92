"""`flannel dicomweb`: the multipart bodies, the bridge's state, outcomes, retries and logs, and
the bridge against a real Orthanc PACS and a real TorchServe.

    .venv/bin/pytest tests/test_dicomweb.py -q
    .venv/bin/pytest tests/test_dicomweb.py -q -m "not slow"      # without Orthanc/TorchServe

The unit tests run the bridge over an in-memory PACS (``MemoryPacs``, the DicomWebClient's four
calls) with an injected predictor; the PACS's HTTP side is tested against a scripted
``http.server`` (503s) and a private Orthanc (tests/orthanc_server.py), skipped where Orthanc or
its DICOMweb plugin is not installed.
"""
from __future__ import annotations

import base64
import copy
import io
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from flannel.handlers.client import PredictResult, RetryPolicy
from flannel.handlers.dicomweb import (DicomWebClient, MultipartError, read_multipart,
                                       write_multipart)
from flannel.handlers.pacs_bridge import (ANSWERED, FAILED, REFUSED, SKIPPED, BridgeConfig,
                                          BridgeState, default_identify, run_bridge)
from flannel import dicom_results
from flannel.samples import real_chest_dicom
from orthanc_server import orthanc_missing, running_orthanc

MODEL = "resnet18"
CR, DX = "1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"
PHI = {"PatientName": "Secretname^Marker", "PatientID": "PHIMARK-4711",
       "PatientBirthDate": "19000101", "AccessionNumber": "ACCPHI0815",
       "InstitutionName": "Hospital Of The Marker"}
PHI_MARKERS = ["Secretname", "PHIMARK", "ACCPHI", "Of The Marker"]
NO_PAUSE = RetryPolicy(attempts=3, base_s=0.0, cap_s=0.0)


# --- DICOM objects ------------------------------------------------------------------------------

def part10(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def new_dataset(sop_class: str, modality: str, study: str | None = None, **attrs) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study or generate_uid(), generate_uid()
    ds.Modality, ds.StudyDate, ds.SeriesNumber, ds.InstanceNumber = modality, "20240301", 1, 1
    for key, value in {**PHI, **attrs}.items():
        setattr(ds, key, value)
    return ds


def radiograph(sop_class: str = CR, modality: str = "CR", seed: int = 0, **attrs) -> bytes:
    """A 32 x 32 12-bit radiograph carrying patient identifiers."""
    ds = new_dataset(sop_class, modality, **attrs)
    ds.Rows = ds.Columns = 32
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.random.default_rng(seed).integers(0, 4096, (32, 32), np.uint16).tobytes()
    return part10(ds)


def pdf_in(modality: str) -> bytes:
    """An encapsulated PDF (a scanned request form) filed under ``modality``."""
    ds = new_dataset(ENCAPSULATED_PDF, modality)
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = b"%PDF-1.4\n%%EOF\n"
    return part10(ds)


def report_of(source: Dataset, prediction: str, model: str = MODEL) -> bytes:
    """The report a server answers with (``flannel.dicom_results``)."""
    content = dicom_results.ResultContent(
        model_name=model, model_version="1.0", artifact_sha256="0" * 64,
        class_names=("COVID-19", "Normal"), probabilities=(0.1, 0.9), prediction=prediction)
    return dicom_results.to_part10(dicom_results.structured_report(source, content))


IDENTITY = dicom_results.report_identity


# --- an in-memory PACS and an injected predictor ------------------------------------------------

class MemoryPacs:
    """The DicomWebClient's calls over a dict of Part 10 files."""

    def __init__(self, files: list[bytes]) -> None:
        self.files = {self._read(f).SOPInstanceUID: f for f in files}
        self.stored: list[bytes] = []
        self.retrieved: list[str] = []

    @staticmethod
    def _read(data: bytes) -> Dataset:
        return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)

    def search_instances(self, modality, since=None, study=None):
        from flannel.handlers.dicomweb import found_instance
        out = []
        for data in self.files.values():
            ds = self._read(data)
            if (ds.Modality == modality and (study is None or ds.StudyInstanceUID == study)
                    and (since is None or ds.StudyDate >= since)):
                out.append(found_instance(ds.to_json_dict()))
        return out

    def retrieve(self, study, series, instance):
        self.retrieved.append(instance)
        return self.files[instance]

    def metadata(self, study, series, instance):
        return self._read(self.files[instance]).to_json_dict()

    def store(self, files):
        for data in files:
            self.stored.append(data)
            self.files[self._read(data).SOPInstanceUID] = data


class Predictor:
    """Answers every file with ``report_of``'s report, except SOP Instance UIDs in ``refuse`` (422,
    with a reason that quotes the patient's ID, as a careless server might)."""

    def __init__(self, refuse: set[str] = frozenset(), crash_after: int | None = None) -> None:
        self.refuse, self.crash_after = refuse, crash_after
        self.sent: list[str] = []

    def __call__(self, files):
        results = []
        for path in files:
            ds = pydicom.dcmread(path)
            ds.pixel_array  # whatever the transfer syntax, the pixels arrived whole
            if self.crash_after is not None and len(self.sent) >= self.crash_after:
                raise SystemExit("the process dies here")
            self.sent.append(ds.SOPInstanceUID)
            if ds.SOPInstanceUID in self.refuse:
                body = {"code": 422, "error": f"not a chest radiograph of {ds.PatientID}"}
                results.append(PredictResult(path, 422, body, json.dumps(body)))
                continue
            body = {"prediction": "Normal", "probabilities": {"Normal": 0.9, "COVID-19": 0.1}}
            if ds.get("BodyPartExamined") == "HAND":
                body["warnings"] = ["BodyPartExamined 'HAND' is not a chest part"]
            body["dicom"] = {"sr": base64.b64encode(report_of(ds, "Normal")).decode()}
            results.append(PredictResult(path, 200, body, json.dumps(body)))
        return results


def config(tmp_path: Path, **changes) -> BridgeConfig:
    return BridgeConfig(**{"url": "memory", "model": MODEL, "state": tmp_path / "state.sqlite",
                           "progress": False, **changes})


def uid_of(data: bytes) -> str:
    return MemoryPacs._read(data).SOPInstanceUID


# --- multipart ----------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["../../etc/passwd", "1.2.3/../4", "1.2.x", "1." * 40 + "1",
                                 "", None])
def test_search_results_with_unusable_uids_are_not_taken(bad):
    from flannel.handlers.dicomweb import SERIES_UID, SOP_UID, STUDY_UID, found_instance

    good = {STUDY_UID: {"Value": ["1.2.3"]}, SERIES_UID: {"Value": ["1.2.3.4"]},
            SOP_UID: {"Value": ["1.2.3.4.5"]}}
    assert found_instance(good).sop_instance_uid == "1.2.3.4.5"
    for tag in (STUDY_UID, SERIES_UID, SOP_UID):
        assert found_instance({**good, tag: {"Value": [bad]}}) is None, (tag, bad)


def test_multipart_round_trip_keeps_binary_parts_whole():
    parts = [b"\r\n--\r\n\r\n", b"--" + b"x" * 40 + b"--\r\n", bytes(range(256)) * 3, b""]
    body, content_type = write_multipart(parts)
    assert content_type.startswith('multipart/related; type="application/dicom"; boundary="')
    read = read_multipart(body, content_type)
    assert [p.content for p in read] == parts
    assert {p.headers["content-type"] for p in read} == {"application/dicom"}


def test_multipart_reads_what_servers_write():
    """Quoted or bare boundary, a preamble, transport padding after a delimiter, a part without
    headers, an epilogue; content holding CRLF, "--", the boundary inside a longer word and the
    boundary not at a line's start."""
    content = b"DICM\r\n--abcd\r\n--ab\r\nx--abc\r\n\x00\xff"
    body = (b"preamble\r\n--abc  \r\nContent-Type: application/dicom\r\nContent-Length: 30\r\n"
            b"\r\n" + content + b"\r\n--abc\r\n\r\nsecond\r\n--abc--\r\nepilogue")
    for header in ('multipart/related; type="application/dicom"; boundary="abc"',
                   "multipart/related; boundary=abc; type=application/dicom"):
        first, second = read_multipart(body, header)
        assert first.content == content and first.headers["content-length"] == "30"
        assert second.content == b"second" and second.headers == {}
    with pytest.raises(MultipartError, match="no closing delimiter"):
        read_multipart(body[:body.index(b"\r\n--abc--")], "multipart/related; boundary=abc")
    with pytest.raises(MultipartError, match="not a multipart"):
        read_multipart(body, "application/dicom")
    with pytest.raises(MultipartError, match="no boundary"):
        read_multipart(body, "multipart/related")


# --- the bridge over an in-memory PACS ----------------------------------------------------------

def corpus() -> dict[str, bytes]:
    return {"cr": radiograph(seed=1), "cr2": radiograph(seed=2),
            "dx": radiograph(DX, "DX", seed=3),
            "dx hand": radiograph(DX, "DX", seed=4, BodyPartExamined="HAND"),
            "refused": radiograph(seed=5), "old": radiograph(seed=6, StudyDate="20200101"),
            "form": pdf_in("DX"), "ct": radiograph(CT, "CT", seed=7)}


def test_each_instance_gets_its_outcome_and_patient_identifiers_stay_out(tmp_path, caplog,
                                                                        capfd):
    files = corpus()
    pacs = MemoryPacs(list(files.values()))
    predict = Predictor(refuse={uid_of(files["refused"])})
    with caplog.at_level(logging.DEBUG):
        summary = run_bridge(config(tmp_path, since="20240101", report=tmp_path / "out.jsonl"),
                             predict, pacs=pacs, identify=IDENTITY)
    by_uid = {o.sop_instance_uid: o for o in summary.outcomes}
    outcome = {name: by_uid.get(uid_of(data)) for name, data in files.items()}
    assert outcome["old"] is None and outcome["ct"] is None  # outside the search
    for name in ("cr", "cr2", "dx", "dx hand"):
        assert outcome[name].outcome == ANSWERED and outcome[name].prediction == "Normal", name
    assert outcome["dx hand"].warning == "BodyPartExamined 'HAND' is not a chest part"
    refused = outcome["refused"]
    assert (refused.outcome, refused.status) == (REFUSED, 422)
    assert refused.reason == "not a chest radiograph of [removed]"
    assert (outcome["form"].outcome, outcome["form"].reason) == (SKIPPED, "not a CR/DX image")
    assert sorted(predict.sent) == sorted(uid_of(files[n])
                                          for n in ("cr", "cr2", "dx", "dx hand", "refused"))
    # Each report went to its source's study, naming the source.
    reports = [MemoryPacs._read(sr) for sr in pacs.stored]
    assert len(reports) == 4
    for report in reports:
        (source,) = IDENTITY(report)[0]
        assert by_uid[source].report_uid == report.SOPInstanceUID
        assert report.StudyInstanceUID == MemoryPacs._read(pacs.files[source]).StudyInstanceUID
    assert summary.line() == ("dicomweb: 6 instances, 4 answered, 1 refused, 0 failed, "
                              "1 skipped (1 not a CR/DX image)")
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {r["outcome"] for r in rows} == {ANSWERED, REFUSED, SKIPPED}
    written = ("\n".join(r.getMessage() for r in caplog.records) + "".join(capfd.readouterr())
               + (tmp_path / "out.jsonl").read_text() + summary.line())
    for marker in PHI_MARKERS:
        assert marker not in written, marker
    assert not list(Path(tmp_path).glob("**/*.dcm"))


def test_a_failure_quoting_the_file_is_reported_without_its_identifiers(tmp_path, caplog):
    """An exception raised while one instance is sent (a client's, a reader's) may quote the
    file: it becomes that instance's "failed" with the identifiers removed, and the others are
    answered."""
    files = [radiograph(seed=1), radiograph(seed=2)]
    broken = uid_of(files[0])
    answer = Predictor()

    def predict(paths):
        ds = pydicom.dcmread(paths[0], stop_before_pixels=True)
        if ds.SOPInstanceUID == broken:
            raise RuntimeError(f"cannot send the file of {ds.PatientName} ({ds.PatientID})")
        return answer(paths)

    with caplog.at_level(logging.DEBUG):
        summary = run_bridge(config(tmp_path, report=tmp_path / "out.jsonl"), predict,
                             pacs=MemoryPacs(files), identify=IDENTITY)
    by_uid = {o.sop_instance_uid: o for o in summary.outcomes}
    assert by_uid[broken].outcome == FAILED
    assert by_uid[broken].reason == "RuntimeError: cannot send the file of [removed] ([removed])"
    assert by_uid[uid_of(files[1])].outcome == ANSWERED
    written = ("\n".join(r.getMessage() for r in caplog.records)
               + (tmp_path / "out.jsonl").read_text())
    for marker in PHI_MARKERS:
        assert marker not in written, marker


def test_csv_report_and_a_second_run_sends_nothing(tmp_path):
    files = corpus()
    pacs = MemoryPacs(list(files.values()))
    run_bridge(config(tmp_path), Predictor(), pacs=pacs, identify=IDENTITY)
    again = Predictor()
    summary = run_bridge(config(tmp_path, report=tmp_path / "out.csv"), again, pacs=pacs,
                         identify=IDENTITY)
    assert again.sent == [] and summary.count(ANSWERED) == 0
    lines = (tmp_path / "out.csv").read_text().splitlines()
    assert lines[0].startswith("sop_instance_uid,outcome,status,prediction,reason")
    assert sum("answered in an earlier run" in line for line in lines) == 6  # old one included


def test_a_crash_loses_at_most_the_instance_in_flight(tmp_path):
    pacs = MemoryPacs([radiograph(seed=i) for i in range(5)])
    crashing = Predictor(crash_after=2)
    with pytest.raises(SystemExit):
        run_bridge(config(tmp_path, check_pacs=False), crashing, pacs=pacs)
    state = BridgeState(tmp_path / "state.sqlite")
    assert [state.done(uid) for uid in crashing.sent] == [ANSWERED, ANSWERED]
    state.close()
    restarted = Predictor()
    summary = run_bridge(config(tmp_path, check_pacs=False), restarted, pacs=pacs)
    assert len(restarted.sent) == 3 and not set(restarted.sent) & set(crashing.sent)
    assert summary.count(ANSWERED) == 3 and len(pacs.stored) == 5
    assert (tmp_path / "state.sqlite").stat().st_mode & 0o077 == 0


def test_reports_already_in_the_pacs_are_not_asked_again(tmp_path):
    """A fresh state file (a new host, a lost file): the PACS's own reports of this model stop
    the instances from being sent; a report by another model does not."""
    first, second = radiograph(seed=1), radiograph(seed=2)
    pacs = MemoryPacs([first, second, report_of(MemoryPacs._read(first), "Normal"),
                       report_of(MemoryPacs._read(second), "Normal", model="densenet121")])
    predict = Predictor()
    summary = run_bridge(config(tmp_path), predict, pacs=pacs, identify=IDENTITY)
    assert predict.sent == [uid_of(second)]
    skipped = [o for o in summary.outcomes if o.outcome == SKIPPED]
    assert [(o.sop_instance_uid, o.reason) for o in skipped] == [
        (uid_of(first), "already reported in the PACS")]
    state = BridgeState(tmp_path / "state.sqlite")
    assert state.done(uid_of(first)) == SKIPPED and state.done(uid_of(second)) == ANSWERED


def test_the_pacs_check_reads_reports_with_dicom_results():
    assert default_identify() is dicom_results.report_identity


def test_polling_ends_after_the_instance_in_flight(tmp_path):
    pacs = MemoryPacs([radiograph(seed=i) for i in range(4)])
    stop = threading.Event()

    class StopAfterOne(Predictor):
        def __call__(self, files):
            stop.set()  # as SIGTERM's handler does, while this instance is in flight
            return super().__call__(files)

    predict = StopAfterOne()
    summary = run_bridge(config(tmp_path, poll_s=30.0), predict, pacs=pacs,
                         identify=IDENTITY, stop=stop)
    assert len(predict.sent) == 1 and [o.outcome for o in summary.outcomes] == [ANSWERED]


# --- retries against a scripted PACS ------------------------------------------------------------

class ScriptedPacs:
    """An HTTP PACS whose QIDO answers one CR instance after ``busy`` 503s and whose WADO answers
    503 always."""

    def __init__(self, found: dict, busy: int) -> None:
        self.requests: list[str] = []
        pacs = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                pacs.requests.append(self.path.split("?")[0])
                qido = self.path.startswith("/instances?")
                if qido and busy <= sum(p == "/instances" for p in pacs.requests) - 1:
                    found_here = [found] if "Modality=CR" in self.path else []
                    body = json.dumps(found_here).encode()
                    self.send_response(200)
                else:
                    body = b"busy"
                    self.send_response(503)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_pacs_503s_are_retried_then_reported_as_failed(tmp_path):
    data = radiograph()
    found = MemoryPacs._read(data).to_json_dict()
    scripted = ScriptedPacs(found, busy=2)
    pauses: list[float] = []
    pacs = DicomWebClient(scripted.url, retry=NO_PAUSE, pause=pauses.append)
    try:
        summary = run_bridge(config(tmp_path, check_pacs=False), Predictor(), pacs=pacs)
    finally:
        scripted.server.shutdown()
    (outcome,) = summary.outcomes
    wado = f"/studies/{found['0020000D']['Value'][0]}/series/{found['0020000E']['Value'][0]}" \
           f"/instances/{outcome.sop_instance_uid}"
    # QIDO: two 503s, then the answer (CR), then DX at once; WADO: 503 three times, given up.
    assert scripted.requests == ["/instances"] * 4 + [wado] * 3
    assert len(pauses) == 4
    assert outcome.outcome == FAILED and "503" in outcome.reason and outcome.status is None
    assert BridgeState(tmp_path / "state.sqlite").done(outcome.sop_instance_uid) is None


# --- a real Orthanc -----------------------------------------------------------------------------

ORTHANC_MISSING = orthanc_missing()
needs_orthanc = pytest.mark.skipif(ORTHANC_MISSING is not None, reason=ORTHANC_MISSING or "")


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    if ORTHANC_MISSING:
        pytest.skip(ORTHANC_MISSING)
    with running_orthanc(tmp_path_factory.mktemp("orthanc")) as server:
        yield server


def renamed(ds: Dataset) -> Dataset:
    """A copy of ``ds`` in a new study and series, with a new SOP Instance UID."""
    out = copy.deepcopy(ds)
    out.StudyInstanceUID, out.SeriesInstanceUID = generate_uid(), generate_uid()
    out.SOPInstanceUID = out.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    out.StudyDate = "20240301"
    return out


@pytest.fixture(scope="module")
def pacs_corpus():
    """The real radiograph, its RLE and JPEG 2000 copies (lossless: the same pixels), a PDF in a
    DX series and pydicom's CT: name -> Part 10 bytes."""
    path = real_chest_dicom()
    if path is None:
        pytest.skip("pydicom-data (RG1_UNCR.dcm) is not installed")
    original = pydicom.dcmread(path)
    rle, j2k = renamed(original), renamed(original)
    rle.compress(pydicom.uid.RLELossless)
    j2k.compress(pydicom.uid.JPEG2000Lossless)
    original.StudyDate = "20240301"
    ct = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
    ct.StudyDate = "20240301"
    return {"real": part10(original), "rle": part10(rle), "j2k": part10(j2k),
            "form": pdf_in("DX"), "ct": part10(ct)}


def reports_in(pacs: DicomWebClient, study: str) -> list[Dataset]:
    return [pydicom.Dataset.from_json(pacs.metadata(i.study, i.series, i.sop_instance_uid))
            for i in pacs.search_instances("SR", study=study)]


@pytest.mark.integration
@pytest.mark.slow
def test_bridge_against_orthanc(orthanc, pacs_corpus, tmp_path):
    pacs = DicomWebClient(orthanc.dicomweb_url)
    pacs.store(list(pacs_corpus.values()))
    datasets = {n: pydicom.dcmread(io.BytesIO(d)) for n, d in pacs_corpus.items()}
    pixels = datasets["real"].pixel_array
    predict = Predictor()

    class SamePixels(Predictor):
        def __call__(self, files):
            for path in files:
                assert np.array_equal(pydicom.dcmread(path).pixel_array, pixels)
            return predict(files)

    summary = run_bridge(config(tmp_path, url=orthanc.dicomweb_url, since="20240101"),
                         SamePixels(), identify=IDENTITY)
    radiographs = {datasets[n].SOPInstanceUID for n in ("real", "rle", "j2k")}
    assert set(predict.sent) == radiographs and len(predict.sent) == 3
    assert summary.count(ANSWERED) == 3 and summary.count(SKIPPED) == 1
    for name in ("real", "rle", "j2k"):
        ds = datasets[name]
        (report,) = reports_in(pacs, ds.StudyInstanceUID)
        assert IDENTITY(report) == ({ds.SOPInstanceUID}, MODEL)
    assert reports_in(pacs, datasets["ct"].StudyInstanceUID) == []

    again = Predictor()
    second = run_bridge(config(tmp_path, url=orthanc.dicomweb_url), again,
                        identify=IDENTITY)
    fresh = Predictor()
    third = run_bridge(config(tmp_path, url=orthanc.dicomweb_url, state=tmp_path / "new.sqlite"),
                       fresh, identify=IDENTITY)
    assert again.sent == [] and fresh.sent == []
    assert {o.reason for o in third.outcomes} == {"already reported in the PACS",
                                                 "not a CR/DX image"}
    print(f"\nOrthanc: {summary.line()}\n  second run: {second.line()}, {len(again.sent)} sent"
          f"\n  fresh state file: {third.line()}, {len(fresh.sent)} sent")


@pytest.mark.integration
@pytest.mark.slow
def test_cli_polls_until_sigterm(orthanc, tmp_path):
    """`flannel dicomweb --poll` on an empty study range ends on SIGTERM with its summary."""
    import signal
    import subprocess
    import sys
    import time

    (tmp_path / "config.properties").write_text("inference_address=http://127.0.0.1:1\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "flannel.cli", "dicomweb", "--url", orthanc.dicomweb_url,
         "--model", MODEL, "--since", "29990101", "--poll", "0.2",
         "--config", str(tmp_path / "config.properties"), "--state", str(tmp_path / "s.db")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(3)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "dicomweb: 0 instances, 0 answered" in out
