"""One version's load, run with a time budget that the server can walk away from.

A load (onnxruntime session creation, child start-up, warm-up) runs on a
thread of its own. The event loop waits for it with the budget; when the
budget runs out (or the server stops) the loop *abandons* the attempt:

- a process executor's children are killed, so its thread returns at once;
- a thread executor's session creation cannot be interrupted (onnxruntime has
  no cancel for it), so its thread runs on, as a daemon that nothing joins, and
  whatever it builds is released when it finishes, never served.

Contract: the loading thread calls `commit()` once the slow part is done and
before it touches anything the server can see; the loop calls `abandon()`.
Exactly one of them wins (a lock orders them), so an abandoned load never
turns READY and a committed one is never abandoned half-way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

_RUNNING, _COMMITTED, _ABANDONED = "running", "committed", "abandoned"


class LoadAttempt:
    def __init__(self, label: str, budget_s: float) -> None:
        self.label = label  # "model 'm' version 1", for messages
        self.budget_s = budget_s
        self._deadline = time.monotonic() + budget_s
        self._lock = threading.Lock()
        self._state = _RUNNING
        self._on_abandon: list[Callable[[], None]] = []
        self.thread: threading.Thread | None = None

    def remaining_s(self) -> float:
        """Seconds left of the budget (never below a small positive floor, so it
        can be handed to a socket timeout)."""
        return max(0.001, self._deadline - time.monotonic())

    @property
    def abandoned(self) -> bool:
        with self._lock:
            return self._state == _ABANDONED

    def on_abandon(self, callback: Callable[[], None]) -> bool:
        """Registers `callback` (any thread; it must not block) to run when the
        attempt is abandoned. Returns False, without registering, when it
        already was: the caller stops what it started itself."""
        with self._lock:
            if self._state == _ABANDONED:
                return False
            self._on_abandon.append(callback)
            return True

    def commit(self) -> bool:
        """From the loading thread: the slow part is done. False when the loop
        abandoned the attempt first (the caller releases what it built)."""
        with self._lock:
            if self._state == _ABANDONED:
                return False
            self._state = _COMMITTED
            self._on_abandon.clear()
            return True

    def abandon(self) -> bool:
        """From the loop: gives up on the load. False when it already committed
        (it is past the slow part and finishes on its own)."""
        with self._lock:
            if self._state != _RUNNING:
                return False
            self._state = _ABANDONED
            callbacks, self._on_abandon = self._on_abandon, []
        for callback in callbacks:
            try:
                callback()
            except Exception:  # a kill that fails must not stop the others
                log.exception("%s: cleaning up an abandoned load failed", self.label)
        return True


# Threads of abandoned loads still running (thread executor: onnxruntime cannot
# be interrupted). Read at exit: the process leaves without waiting for them.
_abandoned: set[threading.Thread] = set()
_abandoned_lock = threading.Lock()


def abandoned_threads_alive() -> int:
    with _abandoned_lock:
        for t in [t for t in _abandoned if not t.is_alive()]:
            _abandoned.discard(t)
        return len(_abandoned)


async def run_with_budget(attempt: LoadAttempt, work: Callable[[], T]) -> T:
    """Runs `work` on a daemon thread of its own (not the loop's executor, which
    asyncio joins at exit) and waits at most the attempt's budget.

    Raises TimeoutError when the budget ran out before `work` committed; the
    attempt is then abandoned. If the awaiting task is cancelled (the server is
    stopping), the attempt is abandoned the same way and the cancellation goes on.
    A `work` that committed is waited for to its end (its tail is short)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if done.cancelled():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)  # type: ignore[arg-type]

    def body() -> None:
        result: T | None = None
        error: BaseException | None = None
        try:
            result = work()
        except BaseException as exc:  # handed to the loop, which decides
            error = exc
        # A closed loop (RuntimeError): the server has stopped; nobody waits.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, result, error)

    thread = threading.Thread(
        target=body, name=f"sluice-load-{attempt.label.replace(' ', '-')}", daemon=True
    )
    attempt.thread = thread
    thread.start()
    budget = attempt.budget_s if attempt.budget_s > 0 else None
    try:
        return await asyncio.wait_for(asyncio.shield(done), budget)
    except (TimeoutError, asyncio.CancelledError) as exc:
        if attempt.abandon():
            done.cancel()
            with _abandoned_lock:
                _abandoned.add(thread)
            raise
        # It committed just before: past the slow part, it ends on its own.
        # A cancellation still goes on once it has.
        result = await asyncio.shield(done)
        if isinstance(exc, asyncio.CancelledError):
            raise
        return result
