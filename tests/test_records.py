"""How journal lines are read: one verdict whichever parser reads a line, errors that say where.

A line is parsed by orjson, or by the json module when it is over 4 MiB or holds an integer beyond
64 bits. Several of these tests were written against mutants of ``yoink/_records.py`` that no test
noticed (``scripts/mutate``); one of them found that lines nested 1,000 to 1,024 levels deep,
records for orjson, were corrupt for the json module.
"""

from __future__ import annotations

import inspect
import logging
import sys
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from yoink import CheckpointManager, CorruptCheckpointError, _json, _records
from yoink._json import LARGE_LINE, MAX_DEPTH
from yoink._lines import (
    FIRST_READ,
    JUDGED_LINE,
    JournalEnd,
    journal_end,
    lines_end,
    tail_reads,
    whole_lines,
    without_torn_tail,
)
from yoink._records import MAX_LINE_BYTES, LineTooLongToRead
from yoink.storage import LocalFileStorage, MemoryStorage

PAD = "x" * (LARGE_LINE + 1)


def nested_objects(levels: int) -> str:
    return '{"a":' * (levels - 1) + "{}" + "}" * (levels - 1)


def nested_lists(levels: int) -> str:
    """An object holding lists inside lists: ``levels`` in all, the object included."""
    return '{"a":' + "[" * (levels - 2) + "[]" + "]" * (levels - 2) + "}"


def nested_objects_beside_others(levels: int) -> str:
    """As nested_objects, with more objects beside them: more brackets than levels."""
    return nested_objects(levels)[:-1] + ',"b":{},"c":[{}]}'


def as_is(line: str) -> str:
    return line


def long(line: str) -> str:
    """The same object with a field that makes the line longer than LARGE_LINE."""
    return f'{line[:-1]},"pad":"{PAD}"}}'


def with_big_integer(line: str) -> str:
    """The same object with an integer beyond 64 bits, which the json module reads exactly."""
    return f'{line[:-1]},"id":100000000000000000000}}'


PATHS: dict[str, Callable[[str], str]] = {"orjson": as_is, "long line": long, "big integer": with_big_integer}


async def replay(*items: str, **options: Any) -> list[dict[str, Any]]:
    storage = MemoryStorage()
    for item in items:
        await storage.write(item)
    manager = CheckpointManager(storage, flush_interval=None, read_only=True, **options)
    try:
        return [record async for record in manager.replay()]
    finally:
        await manager.close()


def depth(value: Any) -> int:
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, level + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "shape", [nested_objects, nested_lists, nested_objects_beside_others], ids=["objects", "lists", "beside"]
)
@pytest.mark.parametrize("levels", [1000, MAX_DEPTH, MAX_DEPTH + 1, MAX_DEPTH + 60, 5000])
async def test_a_deeply_nested_line_is_a_record_or_not_whichever_parser_reads_it(
    levels: int, shape: Callable[[int], str], path: str
) -> None:
    line = shape(levels)
    try:
        orjson.loads(line)
    except orjson.JSONDecodeError:
        is_record = False
    else:
        is_record = True
    assert is_record == (levels <= MAX_DEPTH), "orjson's own limit"
    text = PATHS[path](line) + '\n{"n":2}\n'
    if is_record:
        records = await replay(text)
        assert [depth(r) for r in records] == [levels, 1]
        assert records[1] == {"n": 2}
    else:
        # orjson reads a short line first, and says so itself
        ours = r"nested too deeply: deeper than 1,024 levels: line 1 column 1 \(char 0\)"
        reason = ours if path == "long line" else "depth limit exceeded"
        with pytest.raises(CorruptCheckpointError, match=rf"line 1 \(byte offset 0\) .*{reason}") as caught:
            await replay(text)
        assert (caught.value.line, caught.value.offset) == (1, 0)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("NaN", "NaN is not JSON: line 1 column 1 (char 0)"),
        ("Infinity", "Infinity is not JSON: line 1 column 1 (char 0)"),
        ("-Infinity", "-Infinity is not JSON: line 1 column 1 (char 0)"),
        ("1e400", "number is infinity when parsed as double: line 1 column 1 (char 0)"),
        ("-1e400", "number is infinity when parsed as double: line 1 column 1 (char 0)"),
    ],
)
async def test_a_value_json_cannot_hold_is_corrupt_on_the_json_modules_path_as_for_orjson(
    value: str, reason: str
) -> None:
    line = f'{{"v":{value}}}'
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(line)
    text = '{"n":1}\n' + long(line) + '\n{"n":3}\n'
    with pytest.raises(CorruptCheckpointError) as caught:
        await replay(text)
    assert (caught.value.line, caught.value.offset) == (2, 8)
    assert f"line 2 (byte offset 8) is not a JSON object: {reason}" in str(caught.value)
    assert await replay(text, on_corrupt="skip") == [{"n": 1}, {"n": 3}]


async def test_a_bad_line_that_ends_one_item_is_corrupt_when_records_follow_in_the_next() -> None:
    items = ['{"n":1}\nnot json\n', '{"n":2}\n']
    with pytest.raises(CorruptCheckpointError, match=r"line 2 \(byte offset 8\)") as caught:
        await replay(*items)
    assert (caught.value.line, caught.value.offset) == (2, 8)
    storage_skip = await replay(*items, on_corrupt="skip")
    assert storage_skip == [{"n": 1}, {"n": 2}]


@pytest.mark.parametrize("where", range(4))
async def test_a_bad_line_is_named_by_its_line_and_byte_offset_in_any_item(where: int) -> None:
    # Items of several lines, one without its final newline, some of them not ASCII.
    items = ['{"n":1}\n{"é":2}\n', '{"n":3}', '{"n":4}\n{"ü":"ß"}\n{"n":6}\n', '{"n":7}\n{"n":8}\n']
    lines = [line for item in items for line in item.rstrip("\n").split("\n")]
    bad_index = [1, 2, 4, 6][where]  # a line of the first, second, third or fourth item
    lines[bad_index] = "[broken"
    offset = sum(len(line.encode()) + 1 for line in lines[:bad_index])
    rebuilt, start = [], 0
    for item in items:
        count = len(item.rstrip("\n").split("\n"))
        rebuilt.append("\n".join(lines[start : start + count]) + ("\n" if item.endswith("\n") else ""))
        start += count
    with pytest.raises(CorruptCheckpointError) as caught:
        await replay(*rebuilt)
    assert (caught.value.line, caught.value.offset) == (bad_index + 1, offset)
    assert f"line {bad_index + 1} (byte offset {offset})" in str(caught.value)


def test_a_line_as_deep_as_orjson_allows_parses_on_the_json_path_however_deep_the_caller_is() -> None:
    line = long(nested_objects(MAX_DEPTH))

    def parse_at(frames: int) -> Any:
        return parse_at(frames - 1) if frames else _json.loads(line)

    room = sys.getrecursionlimit() - len(inspect.stack()) - 30  # all but a few frames of the limit
    assert depth(parse_at(room)) == MAX_DEPTH


def test_the_end_of_an_object_is_read_back_one_byte_then_64_kib_growing_sixteenfold() -> None:
    size = 200 << 20
    assert list(tail_reads(size)) == [
        size - 1,
        size - (64 << 10),
        size - (1 << 20),
        size - (16 << 20),
        size - MAX_LINE_BYTES - 1,  # just past the longest line yoink reads, then no further
    ]
    end = MAX_LINE_BYTES + 1
    assert list(tail_reads(end)) == [end - 1, end - (64 << 10), end - (1 << 20), end - (16 << 20), 0]
    assert list(tail_reads(100_000)) == [99_999, 100_000 - (64 << 10), 0]
    assert list(tail_reads(1)) == [0]
    assert list(tail_reads(0)) == [0]


@pytest.mark.parametrize(
    ("body", "keep", "between"),
    [
        (b'{"n":0}\n', 8, b""),  # yoink's own end
        (b'{"n":0}\n{"n":1}', 15, b"\n"),  # a record without its newline gets one
        (b'{"n":0}\n{"n":1', 8, b""),  # a torn tail
        (b'{"n":0}\n[1,2]\n', 8, b""),  # a whole last line that is not a record
        (b'{"n":0}\n{"n":1\n' + b" \n" * 5000 + b"\t", 8, b""),  # ...after 10 KiB of blank lines
        (b'{"n":0}\n{"n":1}\n' + b" \n" * 5000 + b"\t", 10_017, b"\n"),  # a record there is kept
        (b'["$yoink",{"compaction":{}}]\n\n', 30, b""),  # a compacted journal's header is kept
        (b'{"n":0}\n["$yoink",{}]\n', 8, b""),  # ...only at offset 0
        (b'{"n":0}\n' + b"x" * (JUDGED_LINE + 1) + b"\n", JUDGED_LINE + 10, b""),  # left for replay
        (b'{"n":0}\n{"n\xff\xfe', 8, b""),  # a torn tail that is not UTF-8
        (b"\n[1,2]\n", 1, b""),  # a blank first line stays
    ],
)
async def test_the_end_of_another_tools_journal_is_judged_back_to_its_last_line_that_is_not_blank(
    body: bytes, keep: int, between: bytes
) -> None:
    reads: list[int] = []

    async def read(start: int) -> bytes:
        reads.append(start)
        return body[start:]

    end = await journal_end(read, len(body))
    assert end is not None
    assert (end.keep, end.between) == (keep, between)
    assert end.bad_line == (b"[" in body[keep:] or b'n":1\n' in body[keep:])
    assert reads[0] == max(0, len(body) - FIRST_READ)  # one small read first


async def test_a_last_line_behind_blank_lines_out_of_reach_is_left_for_replay(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Blank lines longer in all than the last read back (just past MAX_LINE_BYTES) hide the last
    line that is not blank: it is left for replay to judge, not taken for a line too long to read."""
    monkeypatch.setattr(_records, "MAX_LINE_BYTES", 4 << 20)  # 4 MiB, not 64, to keep the test small
    blank = b" " * (JUDGED_LINE - 1) + b"\n"
    body = b'{"n":0}\nnot a record\n' + blank * 5

    async def read(start: int) -> bytes:
        return body[start:]

    assert await journal_end(read, len(body)) == JournalEnd(len(body), b"", bad_line=False)
    assert lines_end(lambda start: body[start:], len(body)) == JournalEnd(
        len(body), b"", bad_line=False
    )  # the local journal's judge, the same


def test_the_local_judge_of_whole_lines_reads_the_last_kib_alone_when_it_holds_the_last_line() -> None:
    body = b"".join(b'{"n":%d}\n' % n for n in range(10_000)) + b"[1,2]\n\n"
    reads: list[int] = []

    def read(start: int) -> bytes:
        reads.append(start)
        return body[start:]

    assert lines_end(read, len(body)) == JournalEnd(len(body) - 7, b"", bad_line=True)
    assert reads == [len(body) - FIRST_READ]


async def test_a_line_over_the_limit_in_an_item_is_named_after_the_records_before_it() -> None:
    before = '{"n":1}\n{"é":2}\n'
    at_limit = '{"pad":"' + "x" * (MAX_LINE_BYTES - 10) + '"}'  # MAX_LINE_BYTES bytes: a record
    assert len(at_limit) == MAX_LINE_BYTES
    records = await replay(before + at_limit + '\n{"n":4}\n')
    assert [len(r) for r in records] == [1, 1, 1, 1]
    del records
    over = "{" + "x" * MAX_LINE_BYTES  # one byte over
    text = before + '{"n":3}\n' + over + '\n{"n":5}\n'
    writer = MemoryStorage()
    await writer.write(text)
    await writer.close()
    storage = MemoryStorage(writer.name)
    manager = CheckpointManager(storage, flush_interval=None, read_only=True)
    seen = []
    with pytest.raises(CorruptCheckpointError) as caught:
        async for record in manager.replay():
            seen.append(record)
    assert seen == [{"n": 1}, {"é": 2}, {"n": 3}]
    offset = len(before.encode()) + len('{"n":3}\n')
    assert (caught.value.line, caught.value.offset) == (4, offset)
    assert str(caught.value) == (
        f"{storage!r}: line 4 (byte offset {offset}) is longer than {MAX_LINE_BYTES:,} bytes, yoink's limit "
        "for a line; yoink never writes such a line, and does not read one (even with on_corrupt='skip')"
    )


async def test_a_storage_read_on_its_own_names_a_line_over_the_limit_by_its_byte_offset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Read without a manager, which counts lines, the error gives the offset alone.
    monkeypatch.setattr(_records, "MAX_LINE_BYTES", 3 << 20)
    path = tmp_path / "j.jsonl"
    path.write_bytes(b'{"n":1}\n' + b'{"long":"' + b"x" * (4 << 20) + b'"}\n')
    storage = LocalFileStorage(path)
    with pytest.raises(CorruptCheckpointError) as caught:
        async for _ in storage.read():
            pass
    assert str(caught.value).startswith(f"{path}: the line at byte offset 8 is longer than 3,145,728 bytes")
    assert (caught.value.line, caught.value.offset) == (0, 8)
    # Through a decoder, which counts lines, the error names the line and the journal.
    async with CheckpointManager(storage, read_only=True) as reader:
        with pytest.raises(CorruptCheckpointError) as caught:
            async for _ in reader.replay():
                pass
    assert str(caught.value).startswith(f"{storage!r}: line 2 (byte offset 8) is longer than 3,145,728 bytes")
    assert (caught.value.line, caught.value.offset) == (2, 8)


async def blocks(*items: str) -> AsyncGenerator[str, None]:
    for item in items:
        yield item


@pytest.mark.parametrize(
    "items",
    [('{"n":1}\n[1]\n', '{"n":2'), ('{"n":1}\n', "[1]\n", '{"n":2')],
    ids=["bad-line-after-a-record", "bad-line-alone-in-its-block"],
)
async def test_a_remote_journals_torn_tail_before_staged_records_is_left_out_and_reported(
    caplog: pytest.LogCaptureFixture, items: tuple[str, ...]
) -> None:
    # S3 and fsspec read another tool's object with its unterminated last line, then their staged
    # batches: a tail that is not a record is left out, and the decoder reading them is told. A
    # block of whole lines is passed on as it is, even one that holds no record.
    problems: list[_records.Problem] = []
    decoder = _records.JournalDecoder("s3://b/j.jsonl", on_corrupt="skip", on_problem=problems.append)
    read = without_torn_tail(blocks(*items), "s3://b/j.jsonl")
    with caplog.at_level(logging.WARNING, logger="yoink"):
        records = [record async for batch in decoder.batches(read) for record in batch]
    assert records == [{"n": 1}]  # a whole line that is not a record is passed on: the decoder judges it
    assert caplog.messages[0] == (
        "s3://b/j.jsonl ends in 6 bytes without a newline that are not a JSON object; staged records "
        "follow them, so they are not part of the journal (the next upload sets them aside)"
    )
    assert problems == [
        _records.TornTail(2, 8, "a JSON list, not an object"),
        _records.TornTail(3, 12, "6 bytes without a newline", left_out=6),
    ]


async def test_a_corrupt_line_is_named_whole_when_raised_and_when_skipped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    items = ('{"n":1}\n[1]\n{"n":2}\n',)
    with pytest.raises(CorruptCheckpointError) as raised:
        await replay(*items)
    assert str(raised.value).endswith(
        ": line 2 (byte offset 8) is not a JSON object: a JSON list, not an object; it is not the "
        "last line, so it is not a torn write (on_corrupt='skip' skips such lines)"
    )
    with caplog.at_level(logging.WARNING, logger="yoink"):
        assert await replay(*items, on_corrupt="skip") == [{"n": 1}, {"n": 2}]
    assert [message.split(": line", 1)[1] for message in caplog.messages] == [
        " 2 (byte offset 8) is not a JSON object: a JSON list, not an object; skipped"
    ]


def test_append_checks_the_bytes_the_format_names() -> None:
    # CheckpointManager.append inlines encode_record's checks with the bytes as literals (a global
    # lookup is a measurable part of its cost): they must be the format's own.
    source = inspect.getsource(CheckpointManager.append)
    assert f"line[0] != {_records.OBJECT_START} or {_records.NEWLINE} in line" in source


async def test_a_negative_integer_beyond_64_bits_in_a_line_with_non_ascii_text_is_read_exactly() -> None:
    # The quick test for long digit runs takes the line's bytes when it is not ASCII.
    assert await replay('{"t":"✓","n":-9223372036854775809}\n') == [{"t": "✓", "n": -9223372036854775809}]


async def test_a_record_over_the_limit_is_refused_naming_its_size(monkeypatch: pytest.MonkeyPatch) -> None:
    manager = CheckpointManager(MemoryStorage(), flush_interval=None, batch_bytes=64)
    monkeypatch.setattr(_records, "MAX_LINE_BYTES", 100)
    record = {"pad": "x" * 100}  # 110 bytes of JSON, 111 with its newline
    message = "a record of 111 bytes is longer than 100 bytes, yoink's limit for a line; nothing was appended"
    with pytest.raises(ValueError, match=r"^a record of") as refused:
        await manager.append_many([record])
    assert str(refused.value) == message
    with pytest.raises(ValueError, match=r"^a record of") as refused:
        await manager.append(record)
    assert str(refused.value) == message
    # At the limit: 100 bytes of JSON make a line of 101, one too many; 99 make a line of 100.
    for append in (manager.append, lambda record: manager.append_many([record])):
        with pytest.raises(ValueError, match=r"^a record of 101 bytes is longer than 100 bytes"):
            await append({"pad": "x" * 90})
        await append({"pad": "x" * 89})
    assert [record async for record in manager.replay()] == [{"pad": "x" * 89}] * 2
    await manager.close()


async def test_a_long_line_that_is_not_utf8_is_corrupt_and_says_so(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    path.write_bytes(b'{"pad":"' + b"x" * (LARGE_LINE + 1) + b'\xff"}\n{"n":2}\n')
    async with CheckpointManager.from_uri(path, read_only=True) as manager:
        with pytest.raises(CorruptCheckpointError) as raised:
            _ = [record async for record in manager.replay()]
    where = f"line 1 column {LARGE_LINE + 10} (char {LARGE_LINE + 9})"
    reason = f"not valid UTF-8: surrogates not allowed: {where}"
    assert f"line 1 (byte offset 0) is not a JSON object: {reason};" in str(raised.value)


@pytest.mark.parametrize("bad", [10, 11])
async def test_corrupt_lines_past_the_tenth_are_summed_up_in_one_warning(
    bad: int, caplog: pytest.LogCaptureFixture
) -> None:
    items = "".join(["[1]\n" for _ in range(bad)]) + '{"n":1}\n'
    with caplog.at_level(logging.WARNING, logger="yoink"):
        assert await replay(items, on_corrupt="skip") == [{"n": 1}]
    summary = [message for message in caplog.messages if "corrupt lines in all" in message]
    assert len(caplog.messages) == min(bad, 10) + len(summary)
    if bad == 10:
        assert summary == []
    else:
        assert summary[0].startswith("MemoryStorage('anonymous-")  # the journal it names
        assert summary[0].endswith(
            "'): skipped 11 corrupt lines in all (a warning was logged for the first 10)"
        ), summary


async def test_items_of_whole_records_are_decoded_in_one_pass_not_line_by_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The line-by-line parser is for items with a bad line, a long one or a long digit run: an
    # item of plain records, up to LARGE_LINE characters, is decoded in one orjson pass.
    parsed: list[int] = []
    loads = _json.loads
    monkeypatch.setattr(_json, "loads", lambda line: parsed.append(len(line)) or loads(line))
    small = '{"n":1}\n' * 1000
    pad = LARGE_LINE - len('{"n":2}\n{"pad":""}\n')
    largest = '{"n":2}\n{"pad":"' + "p" * pad + '"}\n'
    assert len(largest) == LARGE_LINE
    records = await replay(small, largest)
    assert len(records) == 1002
    assert parsed == [], "an item of plain records was parsed line by line"
    await replay(largest + '{"n":3}\n')  # one character more: line by line, as the rule says
    assert parsed


async def test_a_decoder_reads_an_async_iterator_that_has_no_aclose() -> None:
    class Items:
        def __init__(self) -> None:
            self.items = iter(['{"n":1}\n', '{"n":2}\n'])

        def __aiter__(self) -> Items:
            return self

        async def __anext__(self) -> str:
            try:
                return next(self.items)
            except StopIteration:
                raise StopAsyncIteration from None

    decoder = _records.JournalDecoder("items")
    assert [record async for batch in decoder.batches(Items()) for record in batch] == [{"n": 1}, {"n": 2}]


async def test_a_decoder_raises_on_a_corrupt_line_unless_told_to_skip() -> None:
    decoder = _records.JournalDecoder("journal")  # on_corrupt="raise" unless told otherwise
    decoder.feed('{"n":1}\n[1]\n')
    decoder.feed('{"n":3}\n')  # the bad line is followed: corruption, raised after the records before it
    with pytest.raises(CorruptCheckpointError, match="line 2"):
        decoder.finish()


async def test_a_first_line_of_exactly_the_limit_split_across_chunks_is_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_records, "MAX_LINE_BYTES", 100)
    line = b'{"pad":"' + b"x" * 90 + b'"}'  # 100 bytes: the longest line there may be

    async def chunks() -> AsyncGenerator[bytes, None]:
        yield line  # no newline yet: the line waits, at the limit and not past it
        yield b"\n"

    assert [block async for block in whole_lines(chunks(), describe="j")] == [line.decode() + "\n"]


async def _lines_of(*items: bytes, keep_tail: bool = False) -> list[str]:
    async def chunks() -> AsyncGenerator[bytes, None]:
        for item in items:
            yield item

    return [block async for block in whole_lines(chunks(), describe="j", keep_tail=keep_tail)]


@pytest.mark.parametrize(
    "items",
    [
        (b"x" * 100,),  # the first chunk: nothing waits before it
        (b'{"a":1}\n', b"x" * 100),  # after a chunk that ended in a newline: nothing waits either
        (b'{"a":1}\n' + b"x" * 60, b"x" * 40),  # the line's start, then its rest: 60 + 40 bytes
    ],
    ids=["first", "after-a-newline", "across-chunks"],
)
async def test_a_line_waiting_for_its_newline_is_counted_to_the_byte(
    monkeypatch: pytest.MonkeyPatch, items: tuple[bytes, ...]
) -> None:
    monkeypatch.setattr(_records, "MAX_LINE_BYTES", 100)
    # 100 bytes wait for a newline: at the limit, not past it, so reading goes on
    assert await _lines_of(*items, b"\n") == [*([] if len(items) == 1 else ['{"a":1}\n']), "x" * 100 + "\n"]
    with pytest.raises(LineTooLongToRead):
        await _lines_of(*items, b"y")  # 101 bytes: past the limit


async def test_a_last_line_kept_whole_is_the_chunks_it_spans_joined(caplog: pytest.LogCaptureFixture) -> None:
    assert await _lines_of(b'{"a":1}\n{"b"', b':2,"c":', b'"\xff"}', keep_tail=True) == [
        '{"a":1}\n',
        '{"b":2,"c":"\udcff"}',  # not UTF-8: kept as the bytes it was, for the decoder to judge
    ]
    with caplog.at_level(logging.WARNING, logger="yoink"):
        assert await _lines_of(b'{"a":1}\n{"b"', b":2", keep_tail=False) == ['{"a":1}\n']
    assert "j ends in 6 bytes without a newline" in caplog.text


async def test_whole_lines_reads_an_async_iterator_that_has_no_aclose() -> None:
    class Chunks:
        def __init__(self) -> None:
            self.items = [b'{"a":1}\n', b'{"b":2}\n']

        def __aiter__(self) -> Chunks:
            return self

        async def __anext__(self) -> bytes:
            if not self.items:
                raise StopAsyncIteration
            return self.items.pop(0)

    assert [block async for block in whole_lines(Chunks(), describe="j")] == ['{"a":1}\n', '{"b":2}\n']


async def test_a_block_of_whole_lines_is_passed_on_even_when_it_holds_no_record(
    caplog: pytest.LogCaptureFixture,
) -> None:
    header = '["$yoink",{"compaction":{}}]\n'
    with caplog.at_level(logging.WARNING, logger="yoink"):
        assert [block async for block in without_torn_tail(blocks(header, "garbage\n"), "j")] == [
            header,
            "garbage\n",
        ]
    assert caplog.text == ""


def test_a_decoder_gives_each_records_line_where_every_line_of_an_item_was_one() -> None:
    """``texts``: what a compaction keeps of a record it keeps, so it must match the records one to
    one, or be None; never the lines of an earlier item."""
    decoder = _records.JournalDecoder("j", on_corrupt="skip")
    assert decoder.texts is None
    header = '["$yoink", {"compaction": {}}]\n'
    fed = [
        (header + '{"a": 1}\n{"b":2}', ['{"a": 1}', '{"b":2}']),  # the header is no record's; no newline
        ("", []),
        ('{"c": 3}\n\n{"d": 4}\n', None),  # a blank line
        ('{"e": 5}\n', ['{"e": 5}']),
        ('{"f": 6}\n[1]\n{"g": 7}\n', None),  # a bad line, skipped
        ('{"n": 18446744073709551616}\n', None),  # read by the json module, line by line
    ]
    for item, texts in fed:
        records = decoder.feed(item)
        assert decoder.texts == texts, item
        if texts is not None:
            assert [orjson.loads(text) for text in texts] == records


@pytest.mark.parametrize("extra", ["1", '{"more":1}'], ids=["a-number", "an-object"])
async def test_a_first_line_that_starts_as_a_header_but_holds_three_items_is_a_bad_line(extra: str) -> None:
    """A header is ``["$yoink", {...}]``, two items, the second an object; a list of three that starts
    so is a line like any other that is not an object: corrupt when records follow it."""
    lookalike = f'["$yoink",{{"compaction":{{}}}},{extra}]'
    with pytest.raises(CorruptCheckpointError) as caught:
        await replay(lookalike + '\n{"n":1}\n')
    assert (caught.value.line, caught.value.offset) == (1, 0)
    assert "line 1 (byte offset 0) is not a JSON object: a JSON list, not an object" in str(caught.value)
    decoder = _records.JournalDecoder("j", on_corrupt="skip")
    assert decoder.feed(lookalike + '\n{"n":1}\n') == [{"n": 1}]
    assert decoder.header is None
    assert decoder.skipped == 1
