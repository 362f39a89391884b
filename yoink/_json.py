"""One line of the journal, parsed as JSON exactly, whatever its size or its numbers.

orjson parses nearly every line. The json module takes the lines orjson would get wrong or parse
too expensively: an integer beyond 64 bits (orjson reads it as a float), and a line over
``LARGE_LINE`` (orjson needs about 13 times a document's size while it parses it). Either way a
line is a record or not by the same rules: json is made to refuse what orjson refuses.
"""

from __future__ import annotations

import json
import math
import re
import sys
import threading
from typing import Any, NoReturn

import orjson

__all__ = ["LARGE_LINE", "MAX_DEPTH", "loads", "long_digit_run"]

LARGE_LINE = 4 << 20  # a line longer than this is parsed by loads() with the json module
MAX_DEPTH = 1024  # orjson's limit for nesting: a line nested deeper is not a record
# orjson reads an integer beyond 64 bits (-9223372036854775809 has 19 digits) as a float.
_LONG_RUN = "0" * 20  # a positive integer of 19 digits always fits in 64 bits (unsigned)
_NEGATIVE_RUN = "-" + "0" * 19  # a negative one of 19 digits may not
_DIGITS = str.maketrans("123456789", "000000000")
_DIGIT_BYTES = bytes.maketrans(b"123456789", b"000000000")
_DIGIT_RUN = re.compile(r"-?[0-9]{19,}")
_recursion_lock = threading.Lock()  # the recursion limit is the interpreter's: raised by one call at a time
_INT64_MIN, _UINT64_MAX = -(1 << 63), (1 << 64) - 1  # what orjson reads as an integer


def loads(line: str) -> Any:
    """Parse one line: with orjson, or, for a long line, with the json module.

    orjson needs about 13 times a document's size while it parses it; json about its size. A
    journal of long lines would otherwise make replay's memory thirteen times its longest line.
    A line that holds an integer beyond 64 bits, which orjson reads as a float, is read again by
    json, which reads it exactly. json refuses what orjson does (NaN, Infinity, numbers that
    overflow a double, text that is not UTF-8), so a line is a record or not whichever parses it.
    """
    if len(line) <= LARGE_LINE:
        record = orjson.loads(line)
        return _json_loads(line) if long_digit_run(line) else record
    if not line.isascii():
        try:
            line.encode()
        except UnicodeEncodeError as exc:  # bytes that were not UTF-8, kept by surrogateescape
            raise json.JSONDecodeError(f"not valid UTF-8: {exc.reason}", line, exc.start) from None
    return _json_loads(line)


def dumps(value: Any, *, sort_keys: bool = False) -> bytes:
    """A value :func:`loads` read, as JSON again (one line, no newline), for a compaction.

    orjson writes what it can; json what orjson cannot: an integer beyond 64 bits, and nesting
    deeper than orjson writes (255 levels), up to MAX_DEPTH, under the same raised recursion limit.
    """
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS if sort_keys else None)
    except TypeError:
        pass
    with _recursion_lock:
        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(limit + 2 * MAX_DEPTH + 64)
        try:
            return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=sort_keys).encode()
        finally:
            sys.setrecursionlimit(limit)


def _json_loads(line: str) -> Any:
    # json recurses once per level, within Python's recursion limit: raised for the call, so that a
    # line nested as deep as orjson allows (MAX_DEPTH) parses here too, whatever the caller's depth.
    with _recursion_lock:
        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(limit + MAX_DEPTH + 64)
        try:
            record = json.loads(line, parse_constant=_no_constant, parse_float=_finite_float)
        except RecursionError:
            record = None  # deeper than the raised limit, so deeper than MAX_DEPTH
            too_deep = True
        else:
            # orjson stops past MAX_DEPTH: a line is a record or not whichever parses it.
            too_deep = line.count("[") + line.count("{") > MAX_DEPTH and _deeper_than(record, MAX_DEPTH)
        finally:
            sys.setrecursionlimit(limit)
    if too_deep:
        raise json.JSONDecodeError(f"nested too deeply: deeper than {MAX_DEPTH:,} levels", line, 0)
    return record


def _deeper_than(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if type(item) is dict else item
        stack.extend((child, depth + 1) for child in children if type(child) in (dict, list))
    return False


def _no_constant(name: str) -> NoReturn:
    raise json.JSONDecodeError(f"{name} is not JSON", name, 0)  # as orjson says


def _finite_float(text: str) -> float:
    number = float(text)
    if math.isinf(number):  # as orjson says
        raise json.JSONDecodeError("number is infinity when parsed as double", text, 0)
    return number


def long_digit_run(text: str) -> bool:
    """Whether ``text`` holds an integer beyond 64 bits, which orjson would read as a float.

    A quick C-speed test comes first (20 digits in a row, or a minus and 19): nanosecond
    timestamps, of 19 digits, never go further. Only then are the runs read. A run inside a string
    may count too: such a line is merely read twice.
    """
    if text.isascii():
        zeroed = text.translate(_DIGITS)
        if _LONG_RUN not in zeroed and _NEGATIVE_RUN not in zeroed:
            return False
    else:
        zeroed_bytes = text.encode("utf-8", "surrogateescape").translate(_DIGIT_BYTES)
        if _LONG_RUN.encode() not in zeroed_bytes and _NEGATIVE_RUN.encode() not in zeroed_bytes:
            return False
    return any(not _INT64_MIN <= int(run[0]) <= _UINT64_MAX for run in _DIGIT_RUN.finditer(text))
