"""Quote what a client sent, never echo it: short, escaped pieces for error messages and logs.

    python -c "from flannel.quoting import quote; print(quote('x' * 2_000_000))"

An error message names the problem and may quote the offending value so that a person can find
it, but a request can hold megabytes of text, control characters that forge log lines, or
terminal escapes. ``quote`` gives at most ``QUOTE_CHARS`` characters of ``repr``-style escaped
text and says how long the whole was; ``clip`` bounds a whole message (an exception's text may
itself carry input) with control characters escaped.
"""
from __future__ import annotations

from typing import Any

# Characters of a client's value quoted in a message: enough to recognise it, never enough to
# flood a log line or an answer.
QUOTE_CHARS = 100
# Characters of a whole error message (the problem plus its quotes), after escaping.
MESSAGE_CHARS = 400


def _escaped(text: str) -> str:
    """``text`` with every non-printable character (newlines, escapes, controls) escaped."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def quote(value: Any, limit: int = QUOTE_CHARS) -> str:
    """A short printable rendering of ``value``: ``repr`` for str/bytes/scalars, the type and
    size for containers, cut to ``limit`` characters with the total length named."""
    if isinstance(value, (dict, list, tuple, set)):
        return f"a {type(value).__name__} of {len(value)} items"
    if isinstance(value, (bytes, bytearray, memoryview)):
        size, head = len(value), bytes(value[:limit])
        text = repr(head)
        return text if size <= limit else f"{text[:limit]}... ({size} bytes)"
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    if isinstance(value, str):
        text = repr(value[:limit])
        return text if len(value) <= limit else f"{text[:limit]}... ({len(value)} characters)"
    text = _escaped(repr(value))
    return text if len(text) <= limit else f"{text[:limit]}..."


def clip(message: str, limit: int = MESSAGE_CHARS) -> str:
    """A whole message, control characters escaped, at most about ``limit`` characters."""
    head = _escaped(str(message)[:limit + 1])
    if len(head) <= limit:
        return head
    return head[:limit] + f"... ({len(message)} characters)"
