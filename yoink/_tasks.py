"""Storage calls that a cancelled caller cannot cut short, and tasks that outlive their starter.

anyio's shielded scopes hold back anyio's and trio's cancellation, but not asyncio's own:
``task.cancel()``, ``asyncio.timeout()``, ``wait_for()`` and a failing ``TaskGroup`` raise
``CancelledError`` inside a shielded scope all the same. A storage call cut short there has an
outcome nobody knows (a thread may still be writing), so yoink never lets that happen:

- on asyncio, :func:`uninterrupted` runs the call in a task of its own; a cancelled caller stops
  waiting (or, with ``finish_first``, waits on and is cancelled afterwards) and the call finishes,
  with its bookkeeping;
- on trio every cancellation goes through scopes, so a shielded scope is enough; the caller's
  cancellation is delivered as soon as the call is done.

:func:`start_background` starts a task that belongs to an object's lifetime rather than to a task
group entered by hand, as the manager's periodic flusher does.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
import anyio.lowlevel

from yoink._exceptions import StorageError

__all__ = ["asyncio_loop_of", "start_background", "uninterrupted"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_running: set[asyncio.Task[Any]] = set()  # the event loop keeps only weak references to tasks


async def uninterrupted(call: Callable[[], Awaitable[T]], *, finish_first: bool = False) -> T:
    """Run ``call()`` to its end, whatever happens to the task that awaits it.

    A cancelled caller raises at once while ``call()`` goes on in its own task; with
    ``finish_first``, the caller waits for it and is cancelled afterwards (for ``close()``, whose
    caller must find the journal released when it returns).
    """
    loop = _asyncio_loop()
    if loop is None:
        if not finish_first:
            await anyio.lowlevel.checkpoint_if_cancelled()  # a cancelled caller starts nothing
        result = await _shielded(call)
        await anyio.lowlevel.checkpoint_if_cancelled()  # and is cancelled once the call is done
        return result
    task: asyncio.Task[T] = loop.create_task(_call(call))
    _running.add(task)
    task.add_done_callback(_finished)
    if not finish_first:
        return await asyncio.shield(task)
    cancelled = False
    with anyio.CancelScope(shield=True):  # anyio's cancellation waits here; asyncio's is caught
        while not task.done():
            try:
                await asyncio.wait((task,))
            except asyncio.CancelledError:
                cancelled = True
    if cancelled:
        if not task.cancelled() and task.exception() is not None:
            logger.error(
                "a storage call finished with an error after its caller was cancelled",
                exc_info=task.exception(),
            )
        raise asyncio.CancelledError
    return task.result()


def start_background(run: Callable[[], Awaitable[None]]) -> anyio.CancelScope:
    """Start ``run()`` in a task of its own; cancelling the returned scope stops it.

    The task is not a child of the caller's task group, so it may be started in one task (an
    ``async with`` in a pytest fixture's setup) and stopped in another (its teardown).
    """
    scope = anyio.CancelScope()

    async def scoped() -> None:
        with scope:
            await run()

    loop = _asyncio_loop()
    if loop is not None:
        task = loop.create_task(scoped())
        _running.add(task)
        task.add_done_callback(_finished)
    else:
        import trio

        trio.lowlevel.spawn_system_task(scoped)
    return scope


def asyncio_loop_of(owner: object, bound: asyncio.AbstractEventLoop | None) -> asyncio.AbstractEventLoop:
    """The running asyncio loop, for a storage whose client library runs on asyncio alone.

    Raises :class:`~yoink.StorageError` under trio, and when the storage's clients were opened on
    another loop (``bound``): they cannot be used, nor even closed, from this one.
    """
    loop = _asyncio_loop()
    if loop is None:
        raise StorageError(
            f"{owner!r} runs on asyncio only, because its client library does, and this is another "
            "event loop (trio?); run it under asyncio, or use a local, memory or fsspec journal"
        )
    if bound is not None and bound is not loop:
        state = "a closed" if bound.is_closed() else "another"
        raise StorageError(
            f"{owner!r} was opened on {state} event loop, to which its connections belong; use one "
            "storage (and manager) per event loop, that is per asyncio.run(), and close it there"
        )
    return loop


async def _shielded(call: Callable[[], Awaitable[T]]) -> T:
    with anyio.CancelScope(shield=True):  # trio: its cancellation always respects a shield
        return await call()
    raise AssertionError("unreachable: a shielded scope does not swallow exceptions")


async def _call(call: Callable[[], Awaitable[T]]) -> T:
    return await call()


def _finished(task: asyncio.Task[Any]) -> None:
    _running.discard(task)
    if not task.cancelled():
        task.exception()  # its caller may have left; the error is its caller's, or nobody's


def _asyncio_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
