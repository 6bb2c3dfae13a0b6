"""Many requests from the event loop served by one blocking call in one thread.

Owns: the single flight between the loop's tasks and a blocking batch function. Every request
made while no batch runs joins the batch that begins on the loop's next turn; every request
made while a batch runs joins the next one, which begins as soon as the running one ends. So a
request is always served by a call that *began after it was made* (what a fresh look at /proc
needs), at most one call runs at a time, and a wave of N simultaneous requests costs O(1) calls
and O(1) thread tasks, however many there are and however few threads the executor has.

Why not a lock or a single flight among threads (`asyncio.to_thread` per request): the default
executor has a handful of threads, so N requests become N thread tasks queued behind each other,
and a shared call can serve only the few requests whose threads are waiting at that moment — a
wave of N costs about N / threads calls. Gathering on the loop costs one future per request.

Must not: decide what the batch does; swallow a request's error (each request gets its own
result or its own exception). A request whose awaiting task is cancelled stays in its batch
(the call may already be running); its result is dropped.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeAlias, TypeVar

T = TypeVar("T")
R = TypeVar("R")

# One item's answer from the batch function: its result, or the exception that item alone raised.
Outcome: TypeAlias = R | BaseException


@dataclass
class _LoopState(Generic[T, R]):
    pending: list[tuple[T, asyncio.Future[R]]] = field(default_factory=list)
    # A batch is scheduled for the next turn or running in its thread.
    busy: bool = False


class LoopBatch(Generic[T, R]):
    """`await batch.submit(item)`: `item` served by the next call of `work` (in a thread).

    `work(items)` gets the items of one batch in request order and returns one outcome per item
    (its result or an exception instance for that item); if `work` itself raises, every item of
    the batch gets that exception. State is kept per event loop, so one module-level instance
    serves every loop of the process (tests run many).
    """

    def __init__(self, work: Callable[[Sequence[T]], list[Outcome[R]]], name: str) -> None:
        self._work = work
        self._name = name
        self._states: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState[T, R]] = (
            weakref.WeakKeyDictionary()
        )

    async def submit(self, item: T) -> R:
        loop = asyncio.get_running_loop()
        state = self._states.get(loop)
        if state is None:
            state = self._states[loop] = _LoopState()
        future: asyncio.Future[R] = loop.create_future()
        state.pending.append((item, future))
        if not state.busy:
            state.busy = True
            # Not at once: the other tasks of this turn (a wave) join the same batch.
            loop.call_soon(self._begin, loop, state)
        # A cancelled requester cancels its own future only: `_end` skips it.
        return await future

    def _begin(self, loop: asyncio.AbstractEventLoop, state: _LoopState[T, R]) -> None:
        batch, state.pending = state.pending, []
        if not batch:
            state.busy = False
            return
        items = [item for item, _ in batch]
        try:
            running = loop.run_in_executor(None, self._work, items)
        except RuntimeError as error:  # the executor is shut down: the loop is ending
            running = loop.create_future()
            running.set_exception(error)
        running.add_done_callback(lambda done: self._end(loop, state, batch, done))

    def _end(
        self,
        loop: asyncio.AbstractEventLoop,
        state: _LoopState[T, R],
        batch: list[tuple[T, asyncio.Future[R]]],
        done: asyncio.Future[list[Outcome[R]]],
    ) -> None:
        outcomes: list[Outcome[R]]
        if done.cancelled():
            for _, future in batch:
                future.cancel()
            outcomes = []
        elif (error := done.exception()) is not None:
            outcomes = [error for _ in batch]
        else:
            outcomes = done.result()
            if len(outcomes) != len(batch):
                error = RuntimeError(f"{self._name}: {len(outcomes)} outcomes for {len(batch)}")
                outcomes = [error for _ in batch]
        for (_, future), outcome in zip(batch, outcomes, strict=False):
            if future.done():
                continue
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)
        # Whoever asked while this batch ran is served by a call that begins now.
        state.busy = False
        if state.pending:
            state.busy = True
            self._begin(loop, state)
