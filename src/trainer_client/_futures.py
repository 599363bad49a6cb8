"""``APIFuture``: the result of a call, awaitable on its loop and ``.result()``-able elsewhere.

aio objects live on the event loop that made them, so a call always runs as a task on
its client's loop. Its future can be:

- awaited on that loop (``await fut``); awaiting from another loop also works;
- waited on from any other thread (``fut.result(timeout)``), which is what the sync
  facade hands out. Calling ``.result()`` on the loop's own thread would deadlock, so it
  raises and says to ``await`` instead.

An error is never lost: if a future fails and nobody retrieves its error (``await``,
``result()`` or ``exception()``), a ``RuntimeWarning`` is emitted when the future is
garbage collected, and the owning session raises
:class:`~trainer_client.PreviousCallFailedError` on its next call.
"""

from __future__ import annotations

import asyncio
import threading
import warnings
from collections.abc import Callable, Generator
from typing import Any, Generic, TypeVar

__all__ = ["APIFuture"]

T = TypeVar("T")


class APIFuture(Generic[T]):
    """A call in flight.

    Args:
        task: the asyncio task running the call.
        on_failure: called (on the loop) with this future when the call fails.
        description: what the call is, for messages (``"optim_step #4"``).
    """

    def __init__(
        self,
        task: asyncio.Future[T],
        *,
        description: str,
        on_failure: Callable[[APIFuture[Any]], None] | None = None,
    ) -> None:
        self._task = task
        self._loop = task.get_loop()
        self._thread_id = threading.get_ident()
        self.description = description
        self._retrieved = False
        self._on_failure = on_failure
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Future[T]) -> None:
        if task.cancelled():
            return
        if task.exception() is not None and self._on_failure is not None:  # also marks asyncio's flag retrieved
            self._on_failure(self)

    def peek_exception(self) -> BaseException | None:
        """The finished call's error without waiting and without marking it retrieved.

        None while the call is pending, when it succeeded, or when it was cancelled.
        """
        if not self._task.done() or self._task.cancelled():
            return None
        return self._task.exception()

    @property
    def error_retrieved(self) -> bool:
        """Whether the caller has seen this future's outcome."""
        return self._retrieved

    def done(self) -> bool:
        """True when the call has finished (successfully or not)."""
        return self._task.done()

    def cancel(self) -> bool:
        """Cancel the call; a cancelled training call is not applied."""
        if self._task.done():
            return False
        self._loop.call_soon_threadsafe(self._task.cancel)
        return True

    async def _wait(self) -> T:
        try:
            return await asyncio.shield(self._task)
        finally:
            if self._task.done():
                self._retrieved = True

    def __await__(self) -> Generator[Any, None, T]:
        return self._await_any_loop().__await__()

    async def _await_any_loop(self) -> T:
        if asyncio.get_running_loop() is self._loop:
            return await self._wait()
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._wait(), self._loop))

    def _check_not_on_loop(self) -> None:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            return
        if running is self._loop:
            raise RuntimeError(
                f"{self.description}: .result() on the event loop's own thread would deadlock; use `await future`"
            )

    def result(self, timeout: float | None = None) -> T:
        """Block until the call finishes and return its result (or raise its error).

        Args:
            timeout: seconds to wait; ``None`` waits as long as the call's own deadline.

        Raises:
            TimeoutError: the call did not finish within ``timeout`` (it keeps running).
            RuntimeError: called from the event loop that runs the call.
        """
        self._check_not_on_loop()
        future = asyncio.run_coroutine_threadsafe(self._wait(), self._loop)
        try:
            return future.result(timeout)
        except TimeoutError as exc:
            if not future.done():
                future.cancel()  # stops waiting only; the call itself goes on
                raise TimeoutError(
                    f"{self.description} did not finish within {timeout} s; it is still running on the server "
                    "(call .result() again to keep waiting, or .cancel() to cancel it)"
                ) from exc
            raise

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """Wait like :meth:`result` and return the call's error, or None."""
        try:
            self.result(timeout)
        except TimeoutError:
            raise
        except BaseException as exc:
            return exc
        return None

    def __repr__(self) -> str:
        state = "done" if self.done() else "pending"
        return f"<APIFuture {self.description} {state}>"

    def __del__(self) -> None:
        task = getattr(self, "_task", None)
        if task is None or self._retrieved or not task.done() or task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            warnings.warn(
                f"{self.description} failed and its error was never retrieved: {exc!r}. "
                "Await the future or call .result() to see errors.",
                RuntimeWarning,
                stacklevel=1,
            )
