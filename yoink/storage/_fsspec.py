"""FsspecStorage: a journal on any filesystem fsspec reaches (GCS, Azure, HDFS, SFTP, ...).

Like S3Storage, it stages writes in a local directory that survives a crash and uploads them at
:meth:`flush`. fsspec has no conditional writes and no object metadata, so the guarantees rest on
what every store has: an object's size, and the bytes an upload left. See the class docstring for
what that can and cannot do.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, BinaryIO, TypeVar

import anyio
import anyio.to_thread
import fsspec

from yoink._exceptions import (
    CompactionNotSupportedError,
    ConcurrentWriterError,
    MissingDependencyError,
    StorageError,
    YoinkError,
)
from yoink._lines import journal_end, whole_lines, without_torn_tail
from yoink._records import MAX_LINE_BYTES
from yoink.storage._factory import FSSPEC_PREFIX
from yoink.storage._files import READ_CHUNK, TORN_SUFFIX
from yoink.storage._fsspec_file import CannotAppend, JournalFile, Moved, Swap, View
from yoink.storage._fsspec_upload import Intent, read_staged, upload_groups
from yoink.storage._stage import Batch
from yoink.storage._staged import StagedStorage
from yoink.storage._uri import Options, redact, secrets_in, take_uri_options

__all__ = ["FsspecOptions", "FsspecStorage"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_CARRY_BYTES = 4 << 20  # what one read of the carry copies
_CARRY_ROUNDS = 16  # copies of the carry with uploads going on; the rest is copied with them held


@dataclass(frozen=True)
class FsspecOptions(Options):
    """The options of an :class:`FsspecStorage`, as given (keywords, then the URI's query)."""

    stage_dir: str | os.PathLike[str] | None = None
    storage_options: dict[str, Any] | None = None
    append: bool | None = None


class FsspecStorage(StagedStorage):
    """A journal in one file of an fsspec filesystem, staged locally between flushes.

    ``FsspecStorage("gs://bucket/crawl.jsonl")``; through the factory for ``gs://``, ``gcs://``,
    ``az://``, ``abfs://``, ``abfss://``, ``adl://``, ``hdfs://``, ``webhdfs://``, ``sftp://`` and
    ``ftp://`` URIs, and for any protocol as ``fsspec+<protocol>://...`` (``fsspec+memory://``).
    ``storage_options`` go to the filesystem (credentials, project, account name); they, and a
    password in the URI, never show in a repr, an error or a log line. The URI's query may give
    ``stage_dir`` and ``append`` (``?append=false``); the rest of it is left to fsspec.

    What it promises, as S3Storage does:

    - :meth:`write` appends to a local stage (``stage_dir``, by default under the user's cache
      directory) that survives a crash; the next storage for the URI replays what a crashed one
      staged and uploads it. The stage is locked while a storage writes: a second writer on this
      machine gets :class:`~yoink.CheckpointLockedError`.
    - :meth:`flush` uploads the staged batches; once it returns, they are in the store (and, on a
      local filesystem, fsynced).
    - Exactly once, and never a fragment: before an upload the stage records the file's size and
      the size the upload will give it; its batches are deleted before that record is. A storage
      that finds the record (after a crash, or after an upload that failed part-way) compares the
      bytes the upload left with the staged batches: all of them there, and the batches are not
      uploaded again; some of them, and that fragment is cut off (truncated on a local
      filesystem, else the file is rewritten with the bytes before it) and the batches uploaded
      again. Until then, a replay leaves the fragment out.
    - Another writer: the size is checked again just before each write. If it is not what this
      storage last saw (at its first :meth:`read` or flush), or if the bytes after an interrupted
      upload are not this stage's, the flush raises :class:`~yoink.ConcurrentWriterError` and the
      staged data stays staged.

    - A last line without a newline (another tool's, or a fragment of another stage's upload) is
      judged as replay judges it, as S3Storage does: a JSON object is a record and gets its newline
      before the next upload; anything else is moved to ``<path>.torn`` and cut off.
    - Compaction (:meth:`replace`), on a local filesystem and on fsspec's memory filesystem: what
      is staged is uploaded first (it belongs to the old journal, so nothing from before the swap
      is uploaded after it), and the file's size then is the cut. Flushes go on appending to the
      old file while the new journal is written (``writes_during_replace``); once it is, the bytes
      they appended after the cut are copied after it, the last of them with uploads held, and
      the new journal goes in one step. Local: written beside the file
      (``<path>.<pid>.<random>.yoink-compact``), fsynced, renamed over it, the directory fsynced,
      so a crash leaves the old file (with every flush) or the new one whole (with every flush),
      and the next compaction removes what a crashed one left beside it; a replay under way reads
      on in the file it opened. Memory: the new bytes take the old ones' place in the store at
      once. The swap is fenced as an upload is, by the file's size just before it: another
      writer's change is refused with :class:`~yoink.ConcurrentWriterError`, and the journal
      stays as it left it. Any other filesystem raises :class:`~yoink.CompactionNotSupportedError`
      and changes nothing: fsspec promises no atomic replace there (on object stores a move is a
      copy and a delete; HDFS's rename does not overwrite). For S3, S3Storage compacts.

    What it cannot promise:

    - Cost: on stores that can append (local files, memory, HDFS, Azure Data Lake), a flush sends
      only the new data. On object stores without append or server-side copy through fsspec (GCS,
      Azure Blob), **each flush downloads and re-uploads the whole file**, so flushes grow slower
      as the journal grows. For S3, use ``s3://`` (S3Storage), which does not.
    - Fencing: fsspec has no conditional writes, so a writer that stops (a pause, a frozen VM)
      between its last size check and its write, and another writer that appends meanwhile, put
      the first one's batch after the second one's records; it then gets
      :class:`~yoink.ConcurrentWriterError`, and its batch is not uploaded again. On a local
      filesystem that window is one ``fstat`` before one ``write``; on a store that rewrites the
      file, it spans the upload, and the other writer's records are lost to the rewrite. A
      writer paused there while another compacts writes to the file the swap replaced; it sees
      that (the path holds another file) and keeps its batch staged. A compaction's window is one
      ``stat`` before one ``rename``: a record appended in it, and checked before the rename, is
      lost to the swap. Two writers whose changes leave the same size at the same moment are not
      told apart.
    - A stage that another machine's writer left with an upload interrupted (a crash during it,
      or between it and the stage's cleanup), opened after a compaction: whether that upload
      landed cannot be told from the new file, so its next flush raises
      :class:`~yoink.ConcurrentWriterError` and keeps the batches staged (S3Storage records what
      landed in S3 and does tell).
    """

    def __init__(
        self,
        uri: str,
        *,
        stage_dir: str | os.PathLike[str] | None = None,
        storage_options: dict[str, Any] | None = None,
        append: bool | None = None,
    ) -> None:
        given = FsspecOptions(stage_dir=stage_dir, storage_options=storage_options, append=append)
        uri, from_uri = take_uri_options(type(self), uri.removeprefix(FSSPEC_PREFIX), keep=lambda name: True)
        self._options = options = given.merge(from_uri)
        shown = redact(uri)  # what reprs, errors and logs call the journal
        fs, path = _open_filesystem(uri, options.storage_options, shown)
        self._file = JournalFile.on(fs, path)
        self._append = options.append  # None: try appending, and fall back to rewriting the file
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        self._full_uri = uri  # for pickling: it may hold credentials, which are never shown
        self._journal_id = ("fsspec", protocol, path)
        super().__init__(shown, options.stage_dir, identity=f"fsspec|{protocol}|{path}")
        self._known_size: int | None = None  # the file's size as this writer last saw or left it
        self._clean_end = False  # the file is known to end in a newline: this writer's upload made it
        self.writes_during_replace = self._file.swap_refusal() is None  # where it compacts, it carries

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._uri!r})"

    def _constructor_arguments(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (self._full_uri,), self._options.changed()

    async def _open_remote(self, writer: str | None, staged: bool) -> tuple[int, AsyncGenerator[str, None]]:
        view = await self._run(self._file.view)
        try:
            size = view.size
            landed, end = 0, size
            intent = Intent.read(self._stage, writer, self._uri, writing=False) if staged else None
            if intent is not None:
                held = await self._uploaded(intent, size, self._stage.snapshot())
                if held == intent.after - intent.before:
                    landed = intent.through
                elif held:  # a fragment of an interrupted upload: the staged batches follow instead
                    end = intent.before
        except BaseException:
            view.close()
            raise
        if self._known_size is None and not self._closed:
            self._known_size = end  # this writer's view of the file starts here
        blocks = whole_lines(self._chunks(view, end), describe=self._uri, keep_tail=True)
        return landed, without_torn_tail(blocks, self._uri) if staged else blocks

    async def _remote_exists(self) -> bool:
        return await self._run(self._file.exists)

    async def _upload(self, batches: list[Batch]) -> None:
        async with self._stage.uploading():  # a reader looks before it, or after it (_look)
            size = await self._run(self._file.size)
            intent = Intent.read(self._stage, self._stage.writer, self._uri, writing=True)
            if intent is not None:
                size, batches = await self._settle(intent, size, batches)
            for group in upload_groups(batches):
                size = await self._upload_group(group, size, sum(batch.size for batch in batches))
                batches = batches[len(group) :]

    async def _look(self) -> tuple[list[tuple[Batch, BinaryIO]], int, AsyncGenerator[str, None]]:
        """As StagedStorage looks, with no upload landing between the look at the stage and the
        look at the file: the file holds no record of which batches it has, so an upload that
        landed and deleted its batches in between would be read twice.

        A look that finds nothing staged needs no lock (a live writer elsewhere keeps its staged
        batches to itself), so a reader beside a stopped writer is not held up by it; else it looks
        again holding :meth:`Stage.looking`, or, where no writer has made that lock, looks again
        if one made it meanwhile (where it cannot be taken, it looks without it)."""
        looked = await super()._look()
        while looked[0]:
            await _forget(looked)
            made = self._stage.upload_lock_made()
            async with self._stage.looking() as locked:
                looked = await super()._look()
            if locked or made or not self._stage.upload_lock_made():
                break  # locked; or a lock it cannot take (another user's); or none was made meanwhile
        return looked

    async def _upload_group(self, group: list[Batch], size: int, staged: int) -> int:
        if self._known_size is None:
            self._known_size = size
        elif size != self._known_size:
            raise self._changed(f"its size went from {self._known_size} to {size} bytes", staged)
        if not self._clean_end and size:
            size = self._known_size = await self._end_cleanly(size, staged)
        data = await self._run(read_staged, group, sys.maxsize)
        after = size + len(data)
        intent = Intent(self._stage.writer, group[0].seq, group[-1].seq, size, after)
        self._stage.write_intent(intent.record())
        try:
            await self._run(self._write_file, data, size)
        except StorageError as exc:
            raise StorageError(
                f"uploading {len(data)} bytes to {self._uri} failed ({exc.__cause__ or exc}); nothing was "
                f"lost: they stay staged in {self._stage.directory}, and the next flush uploads them once "
                "(cutting off any part of them that reached the file)"
            ) from exc
        except Moved as moved:
            if not moved.written:  # its bytes are not in the journal: they stay staged
                self._stage.clear_intent()
                raise self._changed(moved.how(size), staged) from None
            self._known_size = after  # not the file's size: this writer's later flushes are refused too
            await self._stage.discard(group[-1].seq)  # they are in the file: never upload them again
            self._stage.clear_intent()
            raise ConcurrentWriterError(
                f"{self._uri} was changed by another writer just before this one appended {len(data)} "
                f"bytes (it was {moved.size} bytes, not {size}), so they follow the other writer's records; "
                "yoink allows one writer at a time: stop the other one, and check the journal"
            ) from None
        self._known_size = after
        self._clean_end = True
        await self._stage.discard(group[-1].seq)  # before the intent goes: a crash between them is harmless
        self._stage.clear_intent()
        return after

    async def _settle(self, intent: Intent, size: int, batches: list[Batch]) -> tuple[int, list[Batch]]:
        """Finish an upload that was interrupted: recognise it in the file, or cut its fragment off."""
        covered = [batch for batch in batches if batch.seq <= intent.through]
        rest = batches[len(covered) :]
        if not covered or covered[0].seq != intent.first:  # uploaded, then (some of) its batches deleted
            await self._stage.discard(intent.through)
            self._stage.clear_intent()
            return size, rest
        if size == intent.before:  # the upload did not begin
            self._stage.clear_intent()
            return size, batches
        length = await self._uploaded(intent, size, covered)
        if length is None:
            raise self._changed(
                f"it is {size} bytes, and what follows byte {intent.before} is not the upload of this "
                "stage that was interrupted there",
                sum(batch.size for batch in batches),
            )
        if length == intent.after - intent.before:
            logger.info(
                "%s: staged batches up to %d are already uploaded; not uploading them again",
                self._uri,
                intent.through,
            )
            if self._known_size == intent.before:
                self._known_size = intent.after
            await self._stage.discard(intent.through)
            self._stage.clear_intent()
            return size, rest
        logger.warning(
            "%s: an upload was interrupted after %d of its %d bytes; removing those bytes from the file "
            "and uploading the staged batches again",
            self._uri,
            length,
            intent.after - intent.before,
        )
        await self._run(self._file.cut, intent.before)
        self._stage.clear_intent()
        return intent.before, batches

    async def _uploaded(self, intent: Intent, size: int, batches: list[Batch]) -> int | None:
        """How many bytes of the upload ``intent`` the file of ``size`` bytes holds, judged by the bytes.

        The upload's whole length once it landed, however far the file grew after it; fewer for a
        fragment of it, 0 if it did not begin, and None if what follows ``intent.before`` is not it.
        ``batches`` are the stage's: the upload's own are found among them, and when they are gone
        (they are deleted once uploaded) the upload landed. For replay and :meth:`_settle` alike.
        """
        whole = intent.after - intent.before
        covered = [batch for batch in batches if intent.first <= batch.seq <= intent.through]
        if not covered or covered[0].seq != intent.first:
            return whole
        if size < intent.before or sum(batch.size for batch in covered) != whole:
            return None
        length = min(size, intent.after) - intent.before
        if not length:
            return 0  # the file (perhaps not made yet) holds none of it
        try:
            staged = await self._run(read_staged, covered, length)
        except StorageError as exc:
            if isinstance(exc.__cause__, FileNotFoundError):
                return whole  # deleted while this replay looked: this writer's upload just landed
            raise
        return (
            length
            if await self._run(self._file.cat, intent.before, intent.before + length) == staged
            else None
        )

    async def _end_cleanly(self, size: int, staged: int) -> int:
        """End the file as S3Storage ends an object another tool wrote; return the new size.

        Judged by :func:`~yoink._lines.journal_end`: a last line without a newline that is a record
        gets its newline (its own write); a torn tail, and a last line that is not blank and not a
        record, are added to ``<path>.torn`` and cut off.
        """

        async def read(start: int) -> bytes:
            return await self._run(self._file.cat, start, size)

        end = await journal_end(read, size)
        if end is None:
            raise StorageError(
                f"{self._uri} ends in a line longer than {MAX_LINE_BYTES:,} bytes without a newline, which "
                "yoink does not read; nothing was uploaded. Remove that line and flush again"
            )
        if end.between:
            try:
                await self._run(self._write_file, end.between, size)
            except Moved as moved:
                raise self._changed(moved.how(size), staged) from None
            return size + len(end.between)
        if end.keep == size:
            return size
        await self._run(self._file.set_aside, await read(end.keep))
        await self._run(self._file.cut, end.keep)
        logger.warning(
            "%s ended in %s: moved its last %d bytes, from byte offset %d, to %s%s",
            self._uri,
            "a whole last line that is not a JSON object"
            if end.bad_line
            else "bytes without a newline that are not a JSON object",
            size - end.keep,
            end.keep,
            self._uri,
            TORN_SUFFIX,
        )
        return end.keep

    def _check_swappable(self) -> None:
        refusal = self._file.swap_refusal()
        if refusal is not None:
            raise CompactionNotSupportedError(
                f"{self._uri} cannot be compacted: {refusal}. The journal is unchanged, and appending to "
                "it goes on as before"
            )

    async def _cut(self) -> Callable[[AsyncIterator[bytes]], Awaitable[None]]:
        """Fix the old journal's end at the file's size, once it is known to end a line; return what
        writes the new journal beside it and puts it in place, followed by the bytes uploaded since.

        Called with uploads held and nothing staged. The uploads that follow append to the old file
        as usual. Once the new journal is written, its copy of them goes on in rounds with uploads
        going on (a few, so uploads that outpace it cannot keep it going), and ends with them held:
        an interrupted upload is settled first, the last bytes are copied, and the new file takes
        the old one's place if the old one is still the size this writer left it.
        """
        size = await self._run(self._file.size)
        if self._known_size is None:
            self._known_size = size
        elif size != self._known_size:
            raise self._compaction_refused(size)
        if not self._clean_end and size:  # as the next upload would: the cut is a line's end
            self._known_size = await self._end_cleanly(size, 0)
            self._clean_end = True
        cut = self._known_size
        swap = await self._run(self._file.begin_swap)

        async def write_and_swap(data: AsyncIterator[bytes]) -> None:
            try:
                async for chunk in data:
                    await self._run(swap.write, chunk)
                carried = cut
                for _ in range(_CARRY_ROUNDS):
                    if self._uploaded_to() - carried < _CARRY_BYTES:
                        break
                    carried = await self._carry(swap, carried)
                await self._run(swap.sync)  # most of it, before uploads are held for the rest
                async with self._flush_lock:  # close() waits for this compaction: it goes on to its end
                    if Intent.read(self._stage, self._stage.writer, self._uri, writing=True) is not None:
                        await self._upload_staged()  # settles the upload that was interrupted
                    try:
                        size, self._clean_end = await self._run(swap.commit, await self._carry(swap, carried))
                    except Moved as moved:
                        raise self._compaction_refused(moved.size) from None
                    self._known_size = size
            finally:
                with anyio.CancelScope(shield=True):
                    await self._run(swap.discard)

        return write_and_swap

    def _uploaded_to(self) -> int:
        """Where this writer's uploads end in the file, once it is known (it is, in a compaction)."""
        assert self._known_size is not None
        return self._known_size

    async def _carry(self, swap: Swap, start: int) -> int:
        """Copy the old file's bytes from ``start`` to where this writer's uploads end into ``swap``;
        return that end."""
        end = self._uploaded_to()
        while start < end:
            block = await self._run(self._file.cat, start, min(end, start + _CARRY_BYTES))
            if not block:  # cut short by another program: what it cut would be lost, or carried torn
                raise StorageError(
                    f"{self._uri} was cut short by another program during the compaction; nothing was "
                    "replaced, the old journal is kept as it is"
                )
            await self._run(swap.write, block)
            start += len(block)
        return end

    def _compaction_refused(self, size: int) -> ConcurrentWriterError:
        return ConcurrentWriterError(
            f"{self._uri} was changed by another writer (its size went from {self._known_size} to {size} "
            "bytes) while this one compacted it; yoink allows one writer at a time. The compaction was "
            "not applied: the journal is as the other writer left it"
        )

    def _changed(self, how: str, staged: int) -> ConcurrentWriterError:
        return ConcurrentWriterError(
            f"{self._uri} was changed by another writer ({how}); yoink allows one writer at a time. "
            f"Nothing was lost: the {staged} bytes not uploaded stay staged in {self._stage.directory}"
        )

    def _write_file(self, data: bytes, size: int) -> None:
        """Put ``data`` after the file's ``size`` bytes: appending where the store can, else rewriting."""
        if self._append is not False:
            try:
                self._file.append(data, size)
                self._append = True
                return
            except CannotAppend as exc:
                if self._append:
                    raise StorageError(f"appending to {self._uri} failed: {exc.__cause__}") from exc
                logger.info(
                    "%s: the store cannot append (%s); each flush rewrites the file", self._uri, exc.__cause__
                )
                self._append = False
        self._file.rewrite(data, size)

    async def _chunks(self, view: View, size: int) -> AsyncIterator[bytes]:
        """The first ``size`` bytes of ``view``: the old journal whole, whatever a swap does meanwhile."""
        try:
            offset = 0
            while offset < size:
                block = await self._run(view.read, offset, min(size, offset + self._file.read_size))
                if not block:
                    return
                for start in range(0, len(block), READ_CHUNK):
                    yield block[start : start + READ_CHUNK]
                offset += len(block)
        finally:
            view.close()

    async def _run(self, call: Callable[..., T], *args: Any) -> T:
        try:
            return await anyio.to_thread.run_sync(call, *args)
        except (OSError, ValueError, NotImplementedError) as exc:
            raise StorageError(f"{self._uri}: {type(exc).__name__}: {exc}") from exc


async def _forget(looked: tuple[list[tuple[Batch, BinaryIO]], int, AsyncGenerator[str, None]]) -> None:
    staged, _, remote = looked
    for _, file in staged:
        file.close()
    await remote.aclose()  # never begun: its view closes as it is dropped


def _open_filesystem(uri: str, storage_options: dict[str, Any] | None, shown: str) -> tuple[Any, str]:
    """fsspec's filesystem for ``uri`` and the path in it; its errors say nothing secret."""
    try:
        fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    except (ImportError, ValueError) as exc:
        said = _scrub(str(exc), [*secrets_in(uri), *_texts(storage_options)])
        if isinstance(exc, ImportError):  # the protocol's own package: gcsfs, adlfs, ...
            error: YoinkError = MissingDependencyError(f"{shown} needs fsspec's driver for it: {said}")
        else:
            error = StorageError(f"fsspec cannot open {shown}: {said}")
        raise error from (exc if said == str(exc) else None)
    return fs, str(path)


def _texts(options: Any) -> list[str]:
    """Every text in ``storage_options``, nested ones included: any may be a credential."""
    if isinstance(options, str):
        return [options] if len(options) >= 4 else []
    if isinstance(options, dict):
        return [text for value in options.values() for text in _texts(value)]
    if isinstance(options, (list, tuple)):
        return [text for value in options for text in _texts(value)]
    return []


def _scrub(text: str, secrets: list[str]) -> str:
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text
