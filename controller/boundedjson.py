"""JSON from the network, within limits: size, nesting depth, finite numbers, UTF-8.

`json.loads` recurses once per nesting level, so a few kilobytes of `[[[[...`
raise RecursionError (or exhaust the C stack in other parsers). The depth is
measured first with one linear pass that skips string contents, so nothing
deeper than `max_depth` ever reaches the parser. NaN/Infinity literals and
integers of thousands of digits are refused too: every failure is a
`JsonInputError` with a short `reason` (a metric label) and a one-line message.
"""

from __future__ import annotations

import json
import re
from typing import Any

# a JSON string literal (with escapes), skipped by the depth scan
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_MAX_INT_DIGITS = 100


class JsonInputError(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        super().__init__(detail)


def json_depth(raw: bytes) -> int:
    """Maximum nesting depth of `[`/`{` outside string literals (an unterminated string ends the scan)."""
    depth = best = 0
    for chunk in _STRING.split(raw):
        for b in chunk:
            if b in (0x5B, 0x7B):  # [ {
                depth += 1
                if depth > best:
                    best = depth
            elif b in (0x5D, 0x7D):  # ] }
                depth -= 1
    return best


def _no_constant(name: str) -> Any:
    raise JsonInputError("not_finite", f"{name} is not a number JSON allows")


def _int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_INT_DIGITS:
        raise JsonInputError("number_too_long", f"an integer of {len(text)} digits")
    return int(text)


def _float(text: str) -> float:
    x = float(text)
    if x in (float("inf"), float("-inf")):
        raise JsonInputError("not_finite", f"{text[:40]} overflows a float")
    return x


def loads_bounded(raw: bytes | str, *, max_bytes: int, max_depth: int) -> Any:
    """Parse one JSON document of at most `max_bytes` bytes nested at most `max_depth` deep."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else bytes(raw)
    if len(data) > max_bytes:
        raise JsonInputError("too_large", f"{len(data)} bytes exceeds {max_bytes}")
    if json_depth(data) > max_depth:
        raise JsonInputError("too_deep", f"nested deeper than {max_depth} levels")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise JsonInputError("not_utf8", f"not UTF-8 (byte {e.start})") from None
    try:
        return json.loads(text, parse_constant=_no_constant, parse_int=_int, parse_float=_float)
    except JsonInputError:
        raise
    except RecursionError:  # cannot happen below max_depth; kept as a last guard
        raise JsonInputError("too_deep", "nested too deeply") from None
    except ValueError as e:
        raise JsonInputError("not_json", f"not JSON: {str(e).splitlines()[0][:120]}") from None
