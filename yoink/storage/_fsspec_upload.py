"""An FsspecStorage upload: how staged batches are grouped, and the record each leaves in the stage.

Before an upload the stage records the file's size and the size the upload will give it
(:class:`Intent`); a storage that finds the record compares the bytes the upload left with the
staged batches, so an upload is never repeated and never leaves a fragment.
"""

from __future__ import annotations

from dataclasses import dataclass

from yoink._exceptions import StorageError
from yoink.storage._stage import Batch, Stage

__all__ = ["UPLOAD_BYTES", "Intent", "read_staged", "upload_groups"]

UPLOAD_BYTES = 64 << 20  # the most one upload sends (a larger batch goes alone): one intent, one write


@dataclass(frozen=True)
class Intent:
    """What an upload was about to do, recorded in the stage before it began."""

    writer: str  # the stage's writer id: an intent left by an earlier stage's writer is not this one's
    first: int  # the batches it uploads
    through: int
    before: int  # the file's size before it, and after it
    after: int

    @classmethod
    def read(cls, stage: Stage, writer: str | None, describe: str, *, writing: bool) -> Intent | None:
        """``writer``'s upload record in ``stage``, if it left one.

        A record that yoink did not write is passed over with a warning by a reader, and refused to
        a writer, which cannot tell what of its stage was uploaded without it.
        """
        if writer is None:
            return None
        try:
            record = stage.read_intent(strict=True)
            if record is None:
                return None
            intent = cls._parse(record)
        except ValueError as exc:
            if writing:
                raise StorageError(
                    f"{describe}: the stage's upload record {stage.intent_path} is not one yoink wrote "
                    f"({exc}). Nothing was uploaded, and the staged batches in {stage.directory} are kept. "
                    "If the journal already ends with the first of them (an upload that landed before a "
                    "crash), delete those batch files; then remove upload.json and flush again"
                ) from None
            stage.ignore_intent(f"not an upload record yoink wrote ({exc})")
            return None
        return intent if intent.writer == writer else None

    @classmethod
    def _parse(cls, record: dict[str, object]) -> Intent:
        writer, *numbers = (record.get(name) for name in ("writer", "first", "through", "before", "after"))
        if not isinstance(writer, str):
            raise ValueError("its writer is not a text")
        ints = [number for number in numbers if isinstance(number, int) and not isinstance(number, bool)]
        if len(ints) != 4:
            raise ValueError("first, through, before and after are not all whole numbers")
        intent = cls(writer, *ints)
        if not 1 <= intent.first <= intent.through or not 0 <= intent.before <= intent.after:
            raise ValueError("its numbers are out of order")
        return intent

    def record(self) -> dict[str, int | str]:
        return {
            "writer": self.writer,
            "first": self.first,
            "through": self.through,
            "before": self.before,
            "after": self.after,
        }


def upload_groups(batches: list[Batch]) -> list[list[Batch]]:
    """The batches in uploads of at most UPLOAD_BYTES each (a larger batch alone)."""
    groups: list[list[Batch]] = []
    total = UPLOAD_BYTES
    for batch in batches:
        if total + batch.size > UPLOAD_BYTES:
            groups.append([])
            total = 0
        groups[-1].append(batch)
        total += batch.size
    return groups


def read_staged(batches: list[Batch], limit: int) -> bytes:
    """The first ``limit`` bytes of the staged batches, in order."""
    parts: list[bytes] = []
    for batch in batches:
        if limit <= 0:
            break
        with open(batch.path, "rb") as staged:
            parts.append(staged.read(min(batch.size, limit)))
        limit -= len(parts[-1])
    return b"".join(parts)
