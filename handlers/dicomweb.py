"""A DICOMweb client: find instances (QIDO-RS), fetch them and their metadata (WADO-RS), store
new ones (STOW-RS), with the multipart/related bodies WADO and STOW speak.

    from flannel.handlers.dicomweb import DicomWebClient
    pacs = DicomWebClient("http://127.0.0.1:8042/dicom-web")
    for found in pacs.search_instances(modality="CR", since="20240101"):
        data = pacs.retrieve(found.study, found.series, found.sop_instance_uid)

Used by ``flannel dicomweb`` (``flannel.handlers.pacs_bridge``). A PACS that does not answer
(connection refused, reset, the client's timeout) or answers 5xx or 429 is asked again with the
client's capped, jittered backoff (``flannel.handlers.client.RetryPolicy``); any other 4xx is
final and raised as ``DicomWebError`` with its status. Messages name the call (``WADO-RS
retrieve``), never its URL: paths hold study UIDs and queries their parameters.
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass
from email.message import Message
from typing import Callable, Iterator

from flannel.handlers.client import DEFAULT_RETRY, RetryPolicy
from flannel.quoting import clip, quote

log = logging.getLogger(__name__)

DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
# Any transfer syntax the PACS holds: the served decoder reads every syntax a PACS sends.
WADO_ACCEPT = f'multipart/related; type="{DICOM}"; transfer-syntax=*'
# Seconds per PACS request: a whole radiograph (tens of MB) over a slow hospital link.
PACS_TIMEOUT_S = 60.0
# Results per QIDO page (QIDO-RS limit/offset): small enough for any PACS's own page limit.
QIDO_PAGE = 500
# Statuses asked again: the PACS is busy or failing for now (5xx), or throttling (429).
RETRIED = frozenset({429})

# DICOM JSON tags (PS3.18 F.2) of the attributes a search returns.
STUDY_UID, SERIES_UID, SOP_UID = "0020000D", "0020000E", "00080018"
SOP_CLASS, MODALITY = "00080016", "00080060"
FAILED_SOP_SEQUENCE = "00081198"


class DicomWebError(Exception):
    """A DICOMweb request that failed: ``status`` is the PACS's answer (0: no answer)."""

    def __init__(self, message: str, status: int = 0, attempts: int = 1) -> None:
        super().__init__(message)
        self.status = status
        self.attempts = attempts


class MultipartError(ValueError):
    """A multipart/related body that does not parse."""


@dataclass(frozen=True)
class BodyPart:
    """One part of a multipart body: its headers (lower-case names) and its bytes."""

    headers: dict[str, str]
    content: bytes


@dataclass(frozen=True)
class FoundInstance:
    """An instance a QIDO search returned: where it is and what it is."""

    study: str
    series: str
    sop_instance_uid: str
    sop_class_uid: str | None
    modality: str | None


def _content_type(header: str) -> Message:
    message = Message()
    message["content-type"] = header
    return message


def read_multipart(body: bytes, content_type: str) -> list[BodyPart]:
    """The parts of a multipart body (RFC 2046): preamble and epilogue dropped, each part's
    headers and bytes kept as they are (binary content may hold CRLF and "--").

    Args:
        body: the whole body.
        content_type: its Content-Type header, with the (possibly quoted) boundary parameter.

    Returns:
        The parts, in order.

    Raises:
        MultipartError: not multipart, no boundary, or no closing delimiter.
    """
    header = _content_type(content_type)
    if header.get_content_maintype() != "multipart":
        raise MultipartError(f"not a multipart body: {quote(content_type)}")
    boundary = header.get_param("boundary")
    if not isinstance(boundary, str) or not boundary:
        raise MultipartError(f"no boundary in {quote(content_type)}")
    dash = b"--" + boundary.encode("latin-1")
    if _delimiter_at(body, 0, dash):
        pos = len(dash)
    else:
        first = _next_delimiter(body, 0, dash)
        if first < 0:
            raise MultipartError("the boundary never occurs in the body")
        pos = first + 2 + len(dash)
    parts = []
    while not body.startswith(b"--", pos):
        start = body.find(b"\r\n", pos) + 2  # transport padding may follow a delimiter
        end = _next_delimiter(body, start, dash) if start >= 2 else -1
        if end < 0:
            raise MultipartError(f"part {len(parts) + 1} has no closing delimiter")
        parts.append(_body_part(body[start:end]))
        pos = end + 2 + len(dash)
    return parts


def _delimiter_at(body: bytes, pos: int, dash: bytes) -> bool:
    """Whether a delimiter line starts at ``pos``: the boundary, then "--" or optional
    whitespace up to CRLF (so "--abcd" is no delimiter of boundary "abc")."""
    if not body.startswith(dash, pos):
        return False
    rest = body[pos + len(dash):pos + len(dash) + 80]
    return rest.startswith(b"--") or rest.lstrip(b" \t").startswith(b"\r\n")


def _next_delimiter(body: bytes, start: int, dash: bytes) -> int:
    """Where the CRLF before the next delimiter at or after ``start`` is, or -1."""
    at = body.find(b"\r\n" + dash, start)
    while at >= 0 and not _delimiter_at(body, at + 2, dash):
        at = body.find(b"\r\n" + dash, at + 2)
    return at


def _body_part(raw: bytes) -> BodyPart:
    if raw.startswith(b"\r\n"):  # no headers at all
        return BodyPart({}, raw[2:])
    split = raw.find(b"\r\n\r\n")
    if split < 0:
        raise MultipartError("a part has no blank line after its headers")
    headers = {}
    for line in raw[:split].decode("latin-1").split("\r\n"):
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return BodyPart(headers, raw[split + 4:])


def write_multipart(parts: list[bytes], part_type: str = DICOM) -> tuple[bytes, str]:
    """A multipart/related body of ``parts``, each typed ``part_type``.

    Returns:
        The body and its Content-Type header (the boundary occurs in no part).
    """
    boundary = uuid.uuid4().hex
    while any(boundary.encode() in part for part in parts):
        boundary = uuid.uuid4().hex
    chunks = []
    for part in parts:
        chunks += [f"--{boundary}\r\nContent-Type: {part_type}\r\n\r\n".encode(), part, b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f'multipart/related; type="{part_type}"; boundary="{boundary}"'


def _value(item: dict, tag: str) -> str | None:
    values = item.get(tag, {}).get("Value") or [None]
    return values[0] if isinstance(values[0], str) else None


def found_instance(item: dict) -> FoundInstance | None:
    """A QIDO result as a ``FoundInstance``; None when it lacks its UIDs or one is not a valid
    UID (digits and dots, at most 64 characters): the UIDs go into request paths, and a value
    such as "../x" must not address anything else."""
    from pydicom.uid import UID

    study, series, sop = (_value(item, t) for t in (STUDY_UID, SERIES_UID, SOP_UID))
    if not (study and series and sop) or not all(UID(u).is_valid for u in (study, series, sop)):
        return None
    return FoundInstance(study, series, sop, _value(item, SOP_CLASS), _value(item, MODALITY))


class DicomWebClient:
    """A DICOMweb service at ``url`` (its root: ``.../dicom-web``).

    Args:
        url: the service root.
        retry: how often and how patiently a request without a usable answer is sent again.
        timeout: seconds per try.
        pause: how the retry loop waits (tests record the pauses instead).
    """

    def __init__(self, url: str, retry: RetryPolicy = DEFAULT_RETRY,
                 timeout: float = PACS_TIMEOUT_S,
                 pause: Callable[[float], None] = time.sleep) -> None:
        import requests

        self.url = url.rstrip("/")
        self.retry = retry
        self.timeout = timeout
        self._pause = pause
        self._session = requests.Session()

    def _request(self, what: str, method: str, path: str, **kwargs):
        """One answered request (2xx), after retries; ``DicomWebError`` otherwise. ``what``
        names the call in messages (a path holds study UIDs, a query its parameters)."""
        import requests

        tries, start = 0, time.monotonic()
        while True:
            tries += 1
            try:
                answer = self._session.request(method, self.url + path, timeout=self.timeout,
                                               **kwargs)
                status, why = answer.status_code, clip(answer.text[:200], 120)
            except requests.RequestException as exc:
                answer, status, why = None, 0, type(exc).__name__
            if answer is not None and answer.ok:
                return answer
            retried = status == 0 or status >= 500 or status in RETRIED
            pause = self.retry.pause(tries)
            if (not retried or tries >= self.retry.attempts
                    or time.monotonic() - start + pause > self.retry.deadline_s):
                raise DicomWebError(f"{what}: {status or 'no answer'} {why} after {tries} "
                                    f"{'try' if tries == 1 else 'tries'}", status, tries)
            log.info("PACS %s: %s; try %d of %d in %.1f s", what, status or "no answer",
                     tries + 1, self.retry.attempts, pause)
            self._pause(pause)

    def _search(self, path: str, params: dict) -> Iterator[FoundInstance]:
        offset = 0
        while True:
            page = self._request("QIDO-RS search", "GET", path, headers={"Accept": DICOM_JSON},
                                 params={**params, "limit": QIDO_PAGE, "offset": offset})
            items = page.json() if page.content.strip() else []
            unusable = 0
            for item in items:
                found = found_instance(item) if isinstance(item, dict) else None
                if found is not None:
                    yield found
                else:
                    unusable += 1
            if unusable:
                log.warning("QIDO-RS returned %d results without valid Study, Series and SOP "
                            "Instance UIDs; they are not sent", unusable)
            if len(items) < QIDO_PAGE:
                return
            offset += len(items)

    def search_instances(self, modality: str, since: str | None = None,
                         study: str | None = None) -> list[FoundInstance]:
        """Instances of ``modality`` (QIDO-RS), all or in one ``study``, from studies dated
        ``since`` (YYYYMMDD) onwards."""
        params = {"Modality": modality, "includefield": f"{SOP_CLASS},{MODALITY}"}
        if since:
            params["StudyDate"] = f"{since}-"
        path = f"/studies/{study}/instances" if study else "/instances"
        return list(self._search(path, params))

    def retrieve(self, study: str, series: str, instance: str) -> bytes:
        """The instance as a DICOM Part 10 file, in whatever transfer syntax the PACS holds."""
        answer = self._request("WADO-RS retrieve", "GET",
                               f"/studies/{study}/series/{series}/instances/{instance}",
                               headers={"Accept": WADO_ACCEPT})
        parts = read_multipart(answer.content, answer.headers.get("Content-Type", ""))
        if len(parts) != 1:
            raise DicomWebError(f"WADO-RS answered {len(parts)} parts for one instance",
                                answer.status_code)
        return parts[0].content

    def metadata(self, study: str, series: str, instance: str) -> dict:
        """The instance's metadata (WADO-RS), as DICOM JSON."""
        answer = self._request("WADO-RS metadata", "GET",
                               f"/studies/{study}/series/{series}/instances/{instance}/metadata",
                               headers={"Accept": DICOM_JSON})
        items = answer.json()
        if not isinstance(items, list) or len(items) != 1 or not isinstance(items[0], dict):
            raise DicomWebError("WADO-RS metadata is not one data set", answer.status_code)
        return items[0]

    def store(self, files: list[bytes]) -> None:
        """Store DICOM Part 10 files (STOW-RS); ``DicomWebError`` when any is refused."""
        body, content_type = write_multipart(files)
        answer = self._request("STOW-RS store", "POST", "/studies", data=body,
                               headers={"Content-Type": content_type, "Accept": DICOM_JSON})
        reply = json.loads(answer.text) if answer.text.strip() else {}
        if isinstance(reply, dict) and reply.get(FAILED_SOP_SEQUENCE, {}).get("Value"):
            raise DicomWebError("STOW-RS refused the report", answer.status_code)
