"""A classification answer as DICOM objects for a PACS: a Structured Report and a Secondary Capture.

    python -c "from flannel.dicom_results import structured_report; help(structured_report)"

Both objects are built by highdicom from the source radiograph's header (its pixels are never
needed), join the source's study in a series of their own, and copy its patient and study modules
(highdicom copies them from the source; a missing type-2 value such as PatientName, StudyID or
AccessionNumber stays empty). Their Series and SOP Instance UIDs are ``2.25.<int>`` UIDs derived
from the source's SOP Instance UID, the model (name, version, artifact sha256) and the object's
kind, so the same image classified by the same model always gives the same instances and a PACS
receiving one twice keeps one copy.

The Structured Report (``structured_report``) is a Comprehensive SR (the most widely stored SR
class that holds TID 1500; nothing here needs the spatial coordinates of Comprehensive 3D SR)
whose content is a TID 1500 Measurement Report for the procedure "Plain chest X-ray", observed by
the model as a device (TID 1004), with image-level TID 1501 measurement groups, each referencing
the source image and carrying the model's TID 4019 algorithm identification (name, version, and
``artifact_sha256=<hex>`` as an algorithm parameter):

- one "Classification" group: a qualitative evaluation "Classification" (SCT 278201002) whose
  value is the predicted class, and each out-of-distribution warning as a TEXT item
  ``INPUTWARNING`` (TID 1501 is extensible; no standard row holds free text about the input);
- one group per class: its Finding is the class's code and its measurement is "Probability"
  (DCM 122157) in UCUM "1"; the tracking identifier is the class name as given;
- for an ensemble, one group per learner: its measurement is ``LEARNERWEIGHT`` in UCUM "1"; the
  tracking identifier is the learner's name.

A group per class, rather than one group with a probability per class, is what TID 1501 allows:
a group's measurements are about its one Finding, and TID 300 has no row that says which class a
"Probability" is of. Classes with a SNOMED CT concept are coded with it (``FINDING_CODES``);
any other class name, and the concepts DICOM has no code for, use the private scheme
``99FLANNEL`` (declared in the Coding Scheme Identification Sequence).

The Secondary Capture (``overlay_capture``) holds the Grad-CAM overlay, JPEG Baseline compressed
(YBR_FULL_422, as highdicom requires for that syntax), with the source image in its Source Image
Sequence. Its Burned In Annotation is "YES" unless the source declares "NO": the overlay draws no
text of its own, but it is the source's pixels, with whatever the source had burned in.

Nothing here logs; errors name the problem without quoting patient data.
"""
from __future__ import annotations

import hashlib
import io
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import highdicom as hd
import numpy as np
import pydicom
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr.utils import find_content_items
from pydicom.datadict import dictionary_VR
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import JPEGBaseline8Bit

from flannel.quoting import quote

# Written as Manufacturer and as the TID 4019 algorithm manufacturer; ``report_identity`` takes an
# SR as one of ours when its algorithm identification names this manufacturer.
MANUFACTURER = "flannel"
# Private coding scheme for concepts without a standard code (PS3.16 section 8.2: a designator
# beginning "99" is private).
PRIVATE_SCHEME = "99FLANNEL"
PRIVATE_SCHEME_NAME = "flannel chest radiograph classifier concepts"
# Code Value is SH (PS3.5 table 6.2-1): at most 16 characters.
CODE_VALUE_CHARS = 16
# Code Meaning is LO: at most 64 characters.
CODE_MEANING_CHARS = 64

# SNOMED CT concepts of the findings the label schemes name (flannel.labels), keyed by the class
# name in lower case with "_" and "-" as spaces. Normal is in pydicom's DICOM code dictionary
# (codes.SCT.Normal); the disorders are SNOMED CT International concept identifiers.
FINDING_CODES: dict[str, Code] = {
    "covid 19": Code("840539006", "SCT", "COVID-19"),
    "covid": Code("840539006", "SCT", "COVID-19"),
    "pneumonia": Code("233604007", "SCT", "Pneumonia"),
    "viral pneumonia": Code("75570004", "SCT", "Viral pneumonia"),
    "bacterial pneumonia": Code("53084003", "SCT", "Bacterial pneumonia"),
    "normal": codes.SCT.Normal,
}
# SNOMED CT 399208008 |Plain chest X-ray (procedure)|: TID 1500's Procedure Reported.
PROCEDURE_REPORTED = Code("399208008", "SCT", "Plain chest X-ray")
CLASSIFICATION = codes.SCT.Classification
PROBABILITY = codes.DCM.Probability
UNITLESS = codes.UCUM.NoUnits
LEARNER_WEIGHT = Code("LEARNERWEIGHT", PRIVATE_SCHEME, "Ensemble learner weight")
INPUT_WARNING = Code("INPUTWARNING", PRIVATE_SCHEME, "Input out-of-distribution warning")
CLASSIFICATION_GROUP = "Classification"
# TID 4019 Algorithm Parameters are free text: the artifact's digest as "artifact_sha256=<hex>".
SHA256_PARAMETER = "artifact_sha256="

# Series Number is display order only (not unique in DICOM); high numbers sort the derived series
# after the acquired ones in a viewer.
SR_SERIES_NUMBER = 901
SC_SERIES_NUMBER = 902
INSTANCE_NUMBER = 1
# A UUID-derived UID is "2.25." and the decimal of a 128-bit integer (PS3.5 B.2): the first 128
# bits of the sha256 of the object's identity.
UID_BITS = 128
SR_KIND = "classification-sr"
SC_KIND = "gradcam-sc"
# Patient and study attributes highdicom copies from the source into both objects, all type 2
# (PS3.3 C.7.1.1, C.7.2.1): a source may lack them, the result then holds them empty.
COPIED_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
                "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber")
# Patient's Sex values (PS3.3 C.7.1.1); highdicom raises on any other.
PATIENT_SEX_VALUES = ("M", "F", "O")
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# highdicom requires a Patient Orientation for a patient image; for a source without one it is
# passed this and then emptied (type 2C, PS3.3 C.7.6.1), so the result claims no orientation.
STAND_IN_ORIENTATION = ("L", "F")
# Derivation Description is ST: at most 1024 characters.
DERIVATION_CHARS = 1024
# Start of highdicom.valuerep.check_person_name's warning, which quotes the name it doubts.
PERSON_NAME_WARNING = "The string .* is unlikely to represent the intended person name"


@dataclass(frozen=True)
class ResultContent:
    """One image's classification, as the service answered it.

    Attributes:
        model_name, model_version: the served model's name and version.
        artifact_sha256: hex sha256 of the model artifact that computed the answer.
        class_names: the classes, in the model's output order.
        probabilities: each class's probability, in ``class_names`` order.
        prediction: the predicted class, one of ``class_names``.
        learner_weights: an ensemble's weight per learner name; None for a single model.
        warnings: reasons to doubt the input (out-of-distribution warnings).
    """

    model_name: str
    model_version: str
    artifact_sha256: str
    class_names: tuple[str, ...]
    probabilities: tuple[float, ...]
    prediction: str
    learner_weights: dict[str, float] | None = None
    warnings: tuple[str, ...] = ()

    def __post_init__(self):
        if len(self.class_names) != len(self.probabilities):
            raise ValueError(f"{len(self.class_names)} class names but "
                             f"{len(self.probabilities)} probabilities")
        if len(set(self.class_names)) != len(self.class_names):
            raise ValueError("class names repeat")
        if self.prediction not in self.class_names:
            raise ValueError(f"prediction {quote(self.prediction)} is not one of the classes")
        values = list(self.probabilities) + list((self.learner_weights or {}).values())
        if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in values):
            raise ValueError("probabilities and learner weights must be finite, in [0, 1]")

    @classmethod
    def from_answer(cls, body: dict, class_names: Sequence[str],
                    artifact_sha256: str) -> "ResultContent":
        """Build from the service's JSON answer body for one image.

        Args:
            body: ``{"model", "version", "prediction", "probabilities": {class: p}}``, and
                optionally ``"learner_weights": {learner: w}`` and ``"warnings": [str]``.
            class_names: the model's classes, in output order.
            artifact_sha256: hex sha256 of the model artifact that answered.

        Raises:
            ValueError: a class without a probability, or values out of range.
        """
        probabilities = body["probabilities"]
        missing = [c for c in class_names if c not in probabilities]
        if missing:
            raise ValueError(f"the answer has no probability for {quote(missing[0])}")
        weights = body.get("learner_weights")
        return cls(model_name=str(body["model"]), model_version=str(body["version"]),
                   artifact_sha256=artifact_sha256, class_names=tuple(class_names),
                   probabilities=tuple(float(probabilities[c]) for c in class_names),
                   prediction=str(body["prediction"]),
                   learner_weights=None if weights is None else
                   {str(n): float(w) for n, w in weights.items()},
                   warnings=tuple(str(w) for w in body.get("warnings", ())))


def derived_uid(*parts: str) -> str:
    """A ``2.25.<int>`` UID from the sha256 of ``parts``: the same parts, the same UID."""
    digest = hashlib.sha256("\x00".join(parts).encode("utf-8")).digest()
    return f"2.25.{int.from_bytes(digest[:UID_BITS // 8], 'big')}"


def _object_uid(source: pydicom.Dataset, result: ResultContent, kind: str) -> str:
    return derived_uid(str(source.SOPInstanceUID), result.model_name, result.model_version,
                       result.artifact_sha256, kind)


def finding_code(class_name: str) -> Code:
    """The class's SNOMED CT concept (``FINDING_CODES``), else a private ``99FLANNEL`` code whose
    value is derived from the name and whose meaning is the name."""
    key = class_name.lower().replace("_", " ").replace("-", " ").strip()
    if key in FINDING_CODES:
        return FINDING_CODES[key]
    value = "C" + hashlib.sha256(class_name.encode("utf-8")).hexdigest()[:CODE_VALUE_CHARS - 1]
    return Code(value, PRIVATE_SCHEME, class_name[:CODE_MEANING_CHARS] or value)


def evidence_header(source: pydicom.Dataset) -> pydicom.Dataset:
    """A new data set holding ``source``'s elements but its pixel data, with every patient and
    study attribute highdicom copies present (a missing one empty, as type 2 allows) and a
    Patient's Sex that is not one of DICOM's values emptied (highdicom refuses it). ``source``
    is left as it was."""
    header = pydicom.Dataset()
    for element in source:
        if element.keyword not in PIXEL_KEYWORDS:
            header.add(element)
    for keyword in COPIED_TYPE2:
        if keyword not in header or (keyword == "PatientSex"
                                     and header.PatientSex not in PATIENT_SEX_VALUES):
            header.add_new(keyword, dictionary_VR(keyword), None)
    return header


def _algorithm(result: ResultContent) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name=result.model_name, version=result.model_version, manufacturer=MANUFACTURER,
        parameters=[SHA256_PARAMETER + result.artifact_sha256])


def _group(source: pydicom.Dataset, result: ResultContent, label: str, kind: str,
           **content) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    tracking = hd.sr.TrackingIdentifier(
        uid=derived_uid(str(source.SOPInstanceUID), result.model_name, result.model_version,
                        result.artifact_sha256, kind, label),
        identifier=label)
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking, algorithm_id=_algorithm(result),
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
        **content)


def _unitless(name: Code, value: float) -> hd.sr.Measurement:
    return hd.sr.Measurement(name=name, value=float(value), unit=UNITLESS)


def _classification_group(source: pydicom.Dataset, result: ResultContent
                          ) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    group = _group(source, result, CLASSIFICATION_GROUP, "classification",
                   qualitative_evaluations=[hd.sr.QualitativeEvaluation(
                       CLASSIFICATION, finding_code(result.prediction))])
    for warning in result.warnings:
        group[0].ContentSequence.append(hd.sr.TextContentItem(
            INPUT_WARNING, warning, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    return group


def _measurement_groups(source: pydicom.Dataset, result: ResultContent) -> list:
    groups = [_classification_group(source, result)]
    for name, p in zip(result.class_names, result.probabilities):
        groups.append(_group(source, result, name, "class", finding_type=finding_code(name),
                             measurements=[_unitless(PROBABILITY, p)]))
    for learner, weight in (result.learner_weights or {}).items():
        groups.append(_group(source, result, learner, "learner",
                             measurements=[_unitless(LEARNER_WEIGHT, weight)]))
    return groups


def _observation_context(result: ResultContent) -> hd.sr.ObservationContext:
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=derived_uid(result.model_name, result.model_version, result.artifact_sha256,
                        "device"),
        name=result.model_name, manufacturer_name=MANUFACTURER, model_name=result.model_name)
    return hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device, observer_identifying_attributes=device))


@contextmanager
def _names_unquoted() -> Iterator[None]:
    """Silence highdicom's warning about a one-component person name: it quotes the name (the
    patient's or the referring physician's), which must not reach a log."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=PERSON_NAME_WARNING, category=UserWarning)
        yield


def _series_description(result: ResultContent, what: str) -> str:
    # Series Description is LO: 64 characters.
    return f"{what} {result.model_name} v{result.model_version}"[:CODE_MEANING_CHARS]


def structured_report(source: pydicom.Dataset, result: ResultContent) -> pydicom.Dataset:
    """The classification as a Comprehensive SR (TID 1500) in the source's study.

    Args:
        source: the classified radiograph's data set; its header is enough (no PixelData needed).
        result: the classification.

    Returns:
        The SR (a ``highdicom.sr.ComprehensiveSR``), with deterministic Series and SOP Instance
        UIDs.
    """
    source = evidence_header(source)
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(result),
        procedure_reported=PROCEDURE_REPORTED,
        imaging_measurements=_measurement_groups(source, result))
    with _names_unquoted():
        return hd.sr.ComprehensiveSR(
            evidence=[source], content=report[0],
            series_instance_uid=_object_uid(source, result, SR_KIND + "-series"),
            series_number=SR_SERIES_NUMBER,
            sop_instance_uid=_object_uid(source, result, SR_KIND),
            instance_number=INSTANCE_NUMBER, manufacturer=MANUFACTURER, is_complete=True,
            series_description=_series_description(result, "AI classification"),
            manufacturer_model_name=result.model_name[:CODE_MEANING_CHARS],
            software_versions=result.model_version[:CODE_MEANING_CHARS],
            coding_schemes=[CodingSchemeIdentificationItem(PRIVATE_SCHEME,
                                                           name=PRIVATE_SCHEME_NAME)])


def _patient_orientation(source: pydicom.Dataset) -> tuple[str, str] | None:
    value = source.get("PatientOrientation")
    if value is not None and not isinstance(value, str) and len(value) == 2:
        return tuple(str(v) for v in value)
    return None


def overlay_capture(source: pydicom.Dataset, overlay_rgb: np.ndarray,
                    result: ResultContent) -> pydicom.Dataset:
    """The Grad-CAM overlay as a JPEG Baseline Secondary Capture in the source's study.

    Args:
        source: the classified radiograph's data set (header only is enough).
        overlay_rgb: (H, W, 3) uint8 RGB overlay (``flannel.cam.cam_overlay``).
        result: the classification the overlay explains (names the model and the UIDs).

    Returns:
        The SC image (a ``highdicom.sc.SCImage``), with deterministic Series and SOP Instance
        UIDs.
    """
    overlay = np.ascontiguousarray(overlay_rgb)
    if overlay.ndim != 3 or overlay.shape[2] != 3 or overlay.dtype != np.uint8:
        raise ValueError(f"overlay must be (H, W, 3) uint8 RGB, not {overlay.shape} "
                         f"{overlay.dtype}")
    source = evidence_header(source)
    orientation = _patient_orientation(source)
    with _names_unquoted():
        image = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=source, pixel_array=overlay, photometric_interpretation="YBR_FULL_422",
            bits_allocated=8, coordinate_system="PATIENT",
            series_instance_uid=_object_uid(source, result, SC_KIND + "-series"),
            series_number=SC_SERIES_NUMBER,
            sop_instance_uid=_object_uid(source, result, SC_KIND),
            instance_number=INSTANCE_NUMBER, manufacturer=MANUFACTURER,
            patient_orientation=orientation or STAND_IN_ORIENTATION,
            transfer_syntax_uid=JPEGBaseline8Bit,
            series_description=_series_description(result, "Grad-CAM"))
    if orientation is None:
        image.PatientOrientation = None
    image.BurnedInAnnotation = "NO" if source.get("BurnedInAnnotation") == "NO" else "YES"
    image.LossyImageCompression = "01"
    image.SourceImageSequence = hd.ReferencedImageSequence(referenced_images=[source])
    image.DerivationDescription = (f"Grad-CAM of {result.model_name} v{result.model_version} "
                                   f"over the source image")[:DERIVATION_CHARS]
    return image


def _measurement_report(sr: pydicom.Dataset) -> hd.sr.MeasurementReport | None:
    # The SR data set is the root content item of its tree; None when it is no TID 1500 report.
    templates = sr.get("ContentTemplateSequence") or []
    if sr.get("ValueType") != "CONTAINER" or not any(
            t.get("TemplateIdentifier") == "1500" for t in templates):
        return None
    return hd.sr.MeasurementReport.from_sequence([sr])


def _texts(group: hd.sr.MeasurementsAndQualitativeEvaluations, name: Code) -> list[str]:
    """The values of the TEXT items named ``name`` directly in ``group``."""
    return [str(item.TextValue) for item in find_content_items(
        group[0], name=name, value_type=hd.sr.ValueTypeValues.TEXT)]


def _ours(groups: list) -> list:
    """The measurement groups whose algorithm identification names ``MANUFACTURER``."""
    return [g for g in groups if MANUFACTURER in _texts(g, codes.DCM.AlgorithmManufacturer)]


def _single_value(group: hd.sr.MeasurementsAndQualitativeEvaluations, name: Code) -> float | None:
    measurements = group.get_measurements(name=name)
    return float(measurements[0].value) if len(measurements) == 1 else None


def _source_uids(sr: pydicom.Dataset) -> set[str]:
    """SOP Instance UIDs of the SR's evidence (Current Requested Procedure Evidence)."""
    return {str(sop.ReferencedSOPInstanceUID)
            for study in sr.get("CurrentRequestedProcedureEvidenceSequence") or []
            for series in study.get("ReferencedSeriesSequence") or []
            for sop in series.get("ReferencedSOPSequence") or []}


def report_identity(sr: pydicom.Dataset) -> tuple[set[str], str | None]:
    """Which images an SR made by ``structured_report`` classifies, and by which model.

    Works on the SR's metadata alone (``pydicom.Dataset.from_json`` of a WADO-RS metadata
    answer): an SR holds no bulk data.

    Args:
        sr: any DICOM data set.

    Returns:
        The SOP Instance UIDs of the source images and the model name; ``(set(), None)`` for an
        object this module did not make.
    """
    try:
        report = _measurement_report(sr)
        groups = _ours(report.get_image_measurement_groups()) if report is not None else []
    except Exception:  # noqa: BLE001 - any SR highdicom cannot read is not one of ours
        return set(), None
    names = {name for g in groups for name in _texts(g, codes.DCM.AlgorithmName)}
    if len(names) != 1:
        return set(), None
    return _source_uids(sr), names.pop()


def read_report(sr: pydicom.Dataset) -> dict:
    """Read back what ``structured_report`` wrote.

    Args:
        sr: an SR made by ``structured_report`` (read from a file, or from JSON metadata).

    Returns:
        ``{"model_name", "model_version", "artifact_sha256", "prediction", "probabilities":
        {class: p}, "learner_weights": {learner: w} or None, "warnings": [str],
        "source_sop_instance_uids": set}``; the classes in the order the SR holds them.

    Raises:
        ValueError: ``sr`` is not a classification report made by this module (highdicom's own
            error passes through for a content tree it cannot parse).
    """
    report = _measurement_report(sr)
    groups = _ours(report.get_image_measurement_groups()) if report is not None else []
    if not groups:
        raise ValueError("not a classification report made by flannel.dicom_results")
    first = groups[0]
    parameters = _texts(first, codes.DCM.AlgorithmParameters)
    digests = [p[len(SHA256_PARAMETER):] for p in parameters if p.startswith(SHA256_PARAMETER)]
    probabilities, weights, codes_by_class = {}, {}, {}
    for group in groups:
        p = _single_value(group, PROBABILITY)
        w = _single_value(group, LEARNER_WEIGHT)
        if p is not None:
            probabilities[group.tracking_identifier] = p
            codes_by_class[group.tracking_identifier] = group.finding_type
        if w is not None:
            weights[group.tracking_identifier] = w
    evaluations = [e for g in groups for e in g.get_qualitative_evaluations(name=CLASSIFICATION)]
    predicted = evaluations[0].value if len(evaluations) == 1 else None
    return {"model_name": _texts(first, codes.DCM.AlgorithmName)[0],
            "model_version": _texts(first, codes.DCM.AlgorithmVersion)[0],
            "artifact_sha256": digests[0] if digests else None,
            "prediction": next((c for c, code in codes_by_class.items() if code == predicted),
                               None),
            "probabilities": probabilities, "learner_weights": weights or None,
            "warnings": [w for g in groups for w in _texts(g, INPUT_WARNING)],
            "source_sop_instance_uids": _source_uids(sr)}


def to_part10(ds: pydicom.Dataset) -> bytes:
    """``ds`` as the bytes of a DICOM Part 10 file (preamble, file meta, data set)."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def from_part10(data: bytes) -> pydicom.Dataset:
    """The data set of a DICOM Part 10 file's bytes (the inverse of ``to_part10``)."""
    return pydicom.dcmread(io.BytesIO(data))
