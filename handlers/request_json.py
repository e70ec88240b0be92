"""JSON request bodies parsed under limits: size, nesting, number of values, number length.

    python -c "from flannel.handlers.request_json import parse_json; print(parse_json(b'{}'))"

Python's ``json.loads`` has no limits of its own: a body of ``[[],[],...]`` becomes about 23 times
its size in objects, a body nested 100,000 deep raises ``RecursionError``, and an
integer of 5,000 digits raises ``ValueError`` from ``int``. Every JSON body the handler reads
goes through ``parse_json``, which refuses such bodies with a 4xx naming the limit before (or
instead of) building them:

- the body's size (``MAX_BYTES``, above TorchServe's ``max_request_size``);
- containers (``[`` and ``{``, ``MAX_CONTAINERS``) and values (``max_values``, from the model's
  largest v2 FP32 request), both bounded from above by counting brackets and commas in the raw
  bytes (base64 never holds either), so the parse never starts on a body that would expand;
- nesting depth (``MAX_DEPTH``), checked without recursion;
- the digits of one number (``MAX_NUMBER_CHARS``) and the non-standard NaN and Infinity.

``check_structure`` applies the same container, value and depth limits to a body that arrived
already parsed (TorchServe's own decoding, ``decode_input_request`` left on in config.properties).
"""
from __future__ import annotations

import json
from typing import Any

from flannel.decode import InputError

# A worker never parses more, whatever the frontend admits (config.properties' max_request_size
# is 40 MiB).
MAX_BYTES = 64 * 1024 * 1024
# A v2 FP32 request nests N x 1 x R x R: under 32 * (R + 2) + 1 lists (10,000 at R = 299, the
# largest input side in the registry); plain and v2 BYTES requests hold a handful.
MAX_CONTAINERS = 20_000
# The deepest legitimate body: a v2 request's FP32 data nested four deep inside
# {"inputs": [{"data": ...}]}, seven levels in all.
MAX_DEPTH = 16
# Digits (with sign, point and exponent) of one JSON number: a float32 needs 9 significant
# digits, any sane integer fewer than 20.
MAX_NUMBER_CHARS = 64


class BadRequest(InputError):
    """The request itself is malformed (bad JSON, bad base64, no payload, wrong type)."""


class JSONTooLarge(BadRequest):
    """A JSON body beyond a size or count limit."""

    status = 413


def _number(kind: type):
    def parse(text: str):
        if len(text) > MAX_NUMBER_CHARS:
            raise BadRequest(f"a JSON number has {len(text)} characters; at most "
                                f"{MAX_NUMBER_CHARS} are accepted")
        return kind(text)
    return parse


def _constant(name: str):
    raise BadRequest(f"{name} is not valid JSON (numbers must be finite)")


_DECODER = json.JSONDecoder(parse_int=_number(int), parse_float=_number(float),
                            parse_constant=_constant)


def parse_json(data: bytes, max_values: int) -> Any:
    """Parse a JSON body under the module's limits.

    Args:
        data: the raw body (UTF-8).
        max_values: the most values (array elements and object members) the body may hold.

    Returns:
        The parsed value.

    Raises:
        BadRequest: invalid JSON, too deep or a number too long (400); ``JSONTooLarge`` (413)
            for a body beyond the size, container or value limits.
    """
    if len(data) > MAX_BYTES:
        raise JSONTooLarge(f"JSON body of {len(data)} bytes; at most {MAX_BYTES} are accepted")
    containers = data.count(b"[") + data.count(b"{")
    if containers > MAX_CONTAINERS:
        raise JSONTooLarge(f"JSON body holds up to {containers} arrays and objects; at most "
                           f"{MAX_CONTAINERS} are accepted")
    values = data.count(b",") + 1
    if values > max_values:
        raise JSONTooLarge(f"JSON body holds up to {values} values; at most {max_values} are "
                           f"accepted by this model")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"JSON body is not UTF-8 (byte {exc.start})") from None
    try:
        parsed = _DECODER.decode(text)
    except RecursionError:
        raise BadRequest(f"JSON body nests deeper than {MAX_DEPTH} levels") from None
    except json.JSONDecodeError as exc:
        raise BadRequest(f"body starts like JSON but is not valid JSON: {exc.msg} at line "
                            f"{exc.lineno} column {exc.colno}") from None
    check_structure(parsed, max_values)
    return parsed


def check_structure(value: Any, max_values: int) -> None:
    """Refuse a parsed body deeper than ``MAX_DEPTH`` or with more containers or values than the
    limits, walking it without recursion.

    Raises:
        BadRequest: too deep (400); ``JSONTooLarge`` (413): too many containers or values.
    """
    stack = [(value, 1)]
    containers = values = 0
    while stack:
        node, depth = stack.pop()
        if not isinstance(node, (dict, list)):
            continue
        if depth > MAX_DEPTH:
            raise BadRequest(f"JSON body nests deeper than {MAX_DEPTH} levels")
        containers += 1
        values += len(node)
        if containers > MAX_CONTAINERS or values > max_values:
            raise JSONTooLarge(f"JSON body holds more than {MAX_CONTAINERS} arrays and objects "
                               f"or {max_values} values")
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children
                     if isinstance(child, (dict, list)))
