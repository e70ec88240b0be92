"""The classification answer as DICOM (flannel.dicom_results), on the real chest radiograph.

    .venv/bin/pytest tests/test_dicom_results.py -q
"""
from __future__ import annotations

import base64
import copy
import io
import logging
import math
import re
import warnings

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes
from pydicom.uid import (ComprehensiveSRStorage, DigitalXRayImageStorageForPresentation,
                         JPEGBaseline8Bit, SecondaryCaptureImageStorage)

from flannel.dicom_results import (INPUT_WARNING, LEARNER_WEIGHT, PRIVATE_SCHEME, PROBABILITY,
                                   ResultContent, finding_code, from_part10,
                                   overlay_capture, read_report, report_identity,
                                   structured_report, to_part10)
from flannel.samples import real_chest_dicom

# Mean absolute difference, in 8-bit levels, between a smooth overlay and its JPEG Baseline
# decoding (4:2:2 chroma, Pillow's default quality): about 1 level here; 3 leaves margin and
# still fails a decoding that is wrong in colour space or orientation (tens of levels).
JPEG_MEAN_LEVELS = 3.0
# The server answers with the SC base64-encoded (4/3 the size) inside a JSON answer of at most
# 768 KiB that also holds the SR and the probabilities: half of that for a 512 x 512 overlay.
ANSWER_BYTES = 768 << 10
SC_SHARE = 0.5
# A UID is at most 64 characters (PS3.5 9.1); a 2.25 UID is the decimal of a 128-bit integer.
UID_CHARS = 64
UUID_UID = re.compile(r"2\.25\.(0|[1-9][0-9]*)")

SHA = "3f" * 32
THREE = ("COVID-19", "Pneumonia", "Normal")
FOUR = ("COVID", "Lung_Opacity", "Normal", "Viral Pneumonia")
HAND_WARNING = "DICOM BodyPartExamined HAND is not the chest: the model saw no such image"


@pytest.fixture(scope="module")
def chest() -> pydicom.Dataset:
    path = real_chest_dicom()
    if path is None:
        pytest.skip("pydicom-data (RG1_UNCR.dcm) is not installed")
    return pydicom.dcmread(path)


def header_only(ds: pydicom.Dataset) -> pydicom.Dataset:
    """What the server keeps of a request: the header, the pixels deleted."""
    header = copy.deepcopy(ds)
    del header.PixelData
    return header


def as_dx(ds: pydicom.Dataset) -> pydicom.Dataset:
    """The same image as a DX (MONOCHROME1) object, its own UIDs."""
    dx = header_only(ds)
    dx.SOPClassUID = DigitalXRayImageStorageForPresentation
    dx.Modality = "DX"
    dx.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["dx", ds.SOPInstanceUID])
    dx.SeriesInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["dx", ds.SeriesInstanceUID])
    assert dx.PhotometricInterpretation == "MONOCHROME1"
    return dx


def bare(ds: pydicom.Dataset) -> pydicom.Dataset:
    """A header lacking what real files often lack."""
    header = header_only(ds)
    for keyword in ("PatientName", "StudyID", "AccessionNumber", "SeriesNumber", "StudyDate",
                    "StudyTime", "PatientOrientation", "PatientSex", "PatientBirthDate",
                    "ReferringPhysicianName"):
        delattr(header, keyword)
    return header


VARIANTS = {"cr": copy.copy, "no_pixels": header_only, "dx": as_dx, "bare": bare}


def three_class(version: str = "1") -> ResultContent:
    return ResultContent.from_answer(
        {"model": "resnet18", "version": version, "prediction": "Pneumonia",
         "probabilities": {"COVID-19": 0.125, "Pneumonia": 0.7, "Normal": 0.175}},
        THREE, SHA)


def ensemble() -> ResultContent:
    return ResultContent.from_answer(
        {"model": "ensemble4", "version": "3", "prediction": "Lung_Opacity",
         "probabilities": {"COVID": 0.05, "Lung_Opacity": 0.6, "Normal": 0.3,
                           "Viral Pneumonia": 0.05},
         "learner_weights": {"resnet18": 0.25, "densenet121": 0.75},
         "warnings": [HAND_WARNING, "DICOM Modality MR is not a radiograph"]},
        FOUR, "a1" * 32)


def smooth_overlay(rows: int = 320, columns: int = 288) -> np.ndarray:
    """A Grad-CAM-like overlay: a grey gradient under a red-to-blue heat blob."""
    y, x = np.mgrid[0:rows, 0:columns] / np.array([rows, columns])[:, None, None]
    gray = 0.2 + 0.6 * y
    heat = np.exp(-((x - 0.6) ** 2 + (y - 0.4) ** 2) / 0.05)
    rgb = np.stack([0.5 * gray + 0.5 * heat, 0.5 * gray + 0.25, 0.5 * gray + 0.5 * (1 - heat)],
                   axis=-1)
    return np.round(np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def reread(ds: pydicom.Dataset) -> pydicom.Dataset:
    return from_part10(to_part10(ds))


def metadata_only(ds: pydicom.Dataset) -> pydicom.Dataset:
    """``ds`` as a DICOMweb bridge sees it: WADO-RS metadata (JSON) without any bulk data."""
    def drop_bulk(elements: dict) -> dict:
        kept = {}
        for tag, element in elements.items():
            if "BulkDataURI" in element or "InlineBinary" in element:
                continue
            if element.get("vr") == "SQ":
                element = {**element, "Value": [drop_bulk(i) for i in element.get("Value", [])]}
            kept[tag] = element
        return kept
    return pydicom.Dataset.from_json(drop_bulk(ds.to_json_dict()))


def evidence_uids(sr: pydicom.Dataset) -> tuple[str, str, str]:
    (study,) = sr.CurrentRequestedProcedureEvidenceSequence
    (series,) = study.ReferencedSeriesSequence
    (sop,) = series.ReferencedSOPSequence
    return study.StudyInstanceUID, series.SeriesInstanceUID, sop.ReferencedSOPInstanceUID


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_sr_references_the_source_in_its_study(chest, variant):
    source = VARIANTS[variant](chest)
    sr = reread(structured_report(source, three_class()))
    assert evidence_uids(sr) == (source.StudyInstanceUID, source.SeriesInstanceUID,
                                 source.SOPInstanceUID)
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    assert (sr.Modality, sr.SOPClassUID) == ("SR", ComprehensiveSRStorage)
    assert "resnet18" in sr.SeriesDescription
    for keyword in ("PatientID", "PatientName", "StudyDate", "StudyTime", "AccessionNumber",
                    "StudyID", "PatientBirthDate", "PatientSex"):
        assert str(sr[keyword].value or "") == str(source.get(keyword) or ""), keyword
    if variant == "cr":
        assert "PixelData" in source  # the caller's data set is not stripped
        assert (sr.PatientID, str(sr.PatientName), sr.StudyDate) == (
            "9RG1", "CompressedSamples^RG1", "20040826")


def test_sr_reads_back_what_went_in(chest):
    result = ensemble()
    report = read_report(reread(structured_report(header_only(chest), result)))
    assert report == {
        "model_name": "ensemble4", "model_version": "3", "artifact_sha256": "a1" * 32,
        "prediction": "Lung_Opacity",
        "probabilities": dict(zip(result.class_names, result.probabilities)),
        "learner_weights": {"resnet18": 0.25, "densenet121": 0.75},
        "warnings": [HAND_WARNING, "DICOM Modality MR is not a radiograph"],
        "source_sop_instance_uids": {chest.SOPInstanceUID}}
    single = read_report(reread(structured_report(chest, three_class())))
    assert (single["prediction"], single["learner_weights"], single["warnings"]) == (
        "Pneumonia", None, [])
    assert single["probabilities"] == {"COVID-19": 0.125, "Pneumonia": 0.7, "Normal": 0.175}


def test_highdicom_reparses_the_sr_as_tid1500(chest):
    result = ensemble()
    sr = hd.sr.srread(io.BytesIO(to_part10(structured_report(header_only(chest), result))))
    assert isinstance(sr, hd.sr.ComprehensiveSR)
    report = hd.sr.MeasurementReport.from_sequence([sr])
    groups = report.get_image_measurement_groups(referenced_sop_instance_uid=chest.SOPInstanceUID)
    assert len(groups) == 1 + len(result.class_names) + len(result.learner_weights)
    (device,) = report.get_observer_contexts(observer_type=codes.DCM.Device)
    attributes = device.observer_identifying_attributes
    assert (attributes.name, attributes.manufacturer_name) == ("ensemble4", "flannel")
    opacity = report.get_image_measurement_groups(finding_type=finding_code("Lung_Opacity"))
    (probability,) = opacity[0].get_measurements(name=PROBABILITY)
    assert (probability.value, probability.unit.value, probability.unit.scheme_designator) == (
        0.6, "1", "UCUM")
    (classification,) = groups[0].get_qualitative_evaluations()
    assert classification.value == finding_code("Lung_Opacity")
    assert classification.value.scheme_designator == PRIVATE_SCHEME
    (resnet,) = report.get_image_measurement_groups(tracking_uid=groups[-2].tracking_uid)
    assert resnet.tracking_identifier == "resnet18"
    assert [m.value for m in resnet.get_measurements(name=LEARNER_WEIGHT)] == [0.25]
    assert [i.TextValue for i in groups[0][0].ContentSequence
            if i.ConceptNameCodeSequence[0].CodeValue == INPUT_WARNING.value] == [
        HAND_WARNING, "DICOM Modality MR is not a radiograph"]


def test_findings_use_snomed_where_it_has_a_concept():
    assert finding_code("COVID-19") == finding_code("COVID") == pydicom.sr.Code(
        "840539006", "SCT", "COVID-19")
    assert finding_code("Normal") == codes.SCT.Normal
    assert [finding_code(n).value for n in ("Pneumonia", "Viral Pneumonia",
                                            "bacterial_pneumonia")] == [
        "233604007", "75570004", "53084003"]
    private = finding_code("Lung_Opacity")
    assert (private.scheme_designator, private.meaning) == (PRIVATE_SCHEME, "Lung_Opacity")
    assert len(private.value) <= 16 and private == finding_code("Lung_Opacity")
    assert finding_code("Lung Opacity").value != private.value


def uids(ds: pydicom.Dataset) -> tuple[str, str]:
    return ds.SeriesInstanceUID, ds.SOPInstanceUID


def test_uids_are_derived_from_source_and_model(chest):
    source, overlay = header_only(chest), smooth_overlay()
    sr, again = structured_report(source, three_class()), structured_report(chest, three_class())
    sc = overlay_capture(source, overlay, three_class())
    assert uids(sr) == uids(again)
    assert uids(sc) == uids(overlay_capture(chest, overlay, three_class()))
    assert uids(structured_report(source, three_class("2"))) != uids(sr)
    assert uids(overlay_capture(source, overlay, three_class("2"))) != uids(sc)
    assert uids(structured_report(as_dx(chest), three_class())) != uids(sr)
    every = [*uids(sr), *uids(sc), chest.SeriesInstanceUID, chest.SOPInstanceUID,
             chest.StudyInstanceUID]
    assert len(set(every)) == len(every)
    for uid in (*uids(sr), *uids(sc)):
        assert UUID_UID.fullmatch(uid) and len(uid) <= UID_CHARS, uid
        assert int(uid.split(".")[2]) < 2 ** 128


def test_report_identity_from_wado_metadata(chest):
    sr = reread(structured_report(header_only(chest), ensemble()))
    metadata = metadata_only(sr)
    assert report_identity(metadata) == ({chest.SOPInstanceUID}, "ensemble4")
    assert report_identity(sr) == report_identity(metadata)
    assert read_report(metadata) == read_report(sr)
    sc = reread(overlay_capture(chest, smooth_overlay(), ensemble()))
    for other in (chest, sc, metadata_only(sc)):
        assert report_identity(other) == (set(), None)
    with pytest.raises(ValueError, match="not a classification report"):
        read_report(sc)


def test_sr_of_a_foreign_tid1500_is_not_ours(chest):
    source = header_only(chest)
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=pydicom.uid.generate_uid(),
                                                        identifier="Normal"),
        algorithm_id=hd.sr.AlgorithmIdentification(name="other", version="1"),
        measurements=[hd.sr.Measurement(name=codes.DCM.Probability, value=0.5,
                                        unit=codes.UCUM.NoUnits)])
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=pydicom.uid.generate_uid()))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=codes.SCT.PlainRadiography, imaging_measurements=[group])
    foreign = hd.sr.ComprehensiveSR(
        evidence=[source], content=report[0], series_instance_uid=pydicom.uid.generate_uid(),
        series_number=1, sop_instance_uid=pydicom.uid.generate_uid(), instance_number=1)
    assert report_identity(reread(foreign)) == (set(), None)


def test_overlay_capture_is_small_jpeg_in_the_study(chest):
    overlay = smooth_overlay(512, 512)
    source = header_only(chest)
    data = to_part10(overlay_capture(source, overlay, three_class()))
    assert len(base64.b64encode(data)) < SC_SHARE * ANSWER_BYTES, len(data)
    sc = from_part10(data)
    assert (sc.SOPClassUID, sc.file_meta.TransferSyntaxUID) == (SecondaryCaptureImageStorage,
                                                                 JPEGBaseline8Bit)
    assert sc.StudyInstanceUID == chest.StudyInstanceUID
    assert sc.SeriesInstanceUID not in (chest.SeriesInstanceUID,
                                        structured_report(source, three_class()).SeriesInstanceUID)
    assert (sc.PatientID, str(sc.PatientName), sc.StudyDate) == (chest.PatientID,
                                                                 str(chest.PatientName),
                                                                 chest.StudyDate)
    (ref,) = sc.SourceImageSequence
    assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (chest.SOPClassUID,
                                                                         chest.SOPInstanceUID)
    assert (sc.BurnedInAnnotation, sc.LossyImageCompression) == ("YES", "01")
    assert list(sc.PatientOrientation) == list(chest.PatientOrientation)
    assert "resnet18" in sc.SeriesDescription
    pixels = sc.pixel_array.astype(np.int16)
    error = np.abs(pixels - overlay).mean()
    assert pixels.shape == overlay.shape and error < JPEG_MEAN_LEVELS, error
    image = hd.imread(io.BytesIO(data))
    assert np.abs(image.get_frame(1).astype(np.int16) - overlay).mean() < JPEG_MEAN_LEVELS


def test_burned_in_annotation_follows_a_declared_source(chest):
    source = header_only(chest)
    source.BurnedInAnnotation = "NO"
    assert overlay_capture(source, smooth_overlay(), three_class()).BurnedInAnnotation == "NO"
    source.BurnedInAnnotation = "YES"
    assert overlay_capture(source, smooth_overlay(), three_class()).BurnedInAnnotation == "YES"


def test_sources_missing_attributes_give_empty_values(chest):
    source = bare(chest)
    sr = reread(structured_report(source, ensemble()))
    sc = reread(overlay_capture(source, smooth_overlay(), ensemble()))
    for ds in (sr, sc):
        assert (str(ds.PatientName), ds.StudyID, ds.AccessionNumber, ds.StudyDate) == (
            "", "", "", "")
        assert ds.PatientID == chest.PatientID
    assert sc.PatientOrientation in (None, "", [])
    assert read_report(sr)["prediction"] == "Lung_Opacity"
    assert "PatientName" not in source and "StudyID" not in source  # the source left as it was


def test_no_patient_identifier_reaches_warnings_or_logs(chest, caplog):
    source = header_only(chest)
    source.PatientName = "Doe"
    source.ReferringPhysicianName = "Smith"
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.DEBUG):
        warnings.simplefilter("always")
        structured_report(source, ensemble())
        overlay_capture(source, smooth_overlay(), ensemble())
    said = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [m for m in said if "Doe" in m or "Smith" in m or source.PatientID in m]


def test_from_answer_refuses_what_cannot_be_reported():
    body = {"model": "m", "version": "1", "prediction": "Normal",
            "probabilities": {"COVID-19": 0.2, "Pneumonia": 0.3, "Normal": 0.5}}
    result = ResultContent.from_answer(body, THREE, SHA)
    assert (result.probabilities, result.learner_weights, result.warnings) == (
        (0.2, 0.3, 0.5), None, ())
    with pytest.raises(ValueError, match="no probability"):
        ResultContent.from_answer(body, (*THREE, "Viral Pneumonia"), SHA)
    with pytest.raises(ValueError, match="prediction"):
        ResultContent.from_answer({**body, "prediction": "Tuberculosis"}, THREE, SHA)
    with pytest.raises(ValueError, match="finite"):
        ResultContent.from_answer(
            {**body, "probabilities": {**body["probabilities"], "Normal": math.nan}}, THREE, SHA)
    with pytest.raises(ValueError, match="overlay"):
        overlay_capture(pydicom.Dataset(), np.zeros((8, 8), np.uint8), result)


def test_report_identity_of_an_unreadable_sr_is_not_ours(chest):
    sr = reread(structured_report(header_only(chest), three_class()))
    del sr.ContentSequence[1].ConceptNameCodeSequence  # an SR highdicom refuses to parse
    with pytest.raises(AttributeError):
        read_report(sr)
    assert report_identity(sr) == (set(), None)
