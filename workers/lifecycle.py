"""A module's life in a worker, as Prosody gives it: timers, "ready" and "unload" hooks.

``module.add_timer(delay, fn)`` calls *fn* after *delay* seconds and again after whatever number
it returns (a one-shot timer returns nothing), like Prosody's ``module:add_timer``.
``module.on_ready(fn)`` runs once the worker's loop runs and its sockets accept;
``module.on_unload(fn)`` when the worker stops (graceful stop, reload, fewer workers), while its
connections are still open, so a module can flush state and say goodbye. Any of them may be
``async``. An exception is logged under the module's name and stops only that timer or hook.

Modules are also loaded by the checker, which has no event loop and never serves: there timers
are recorded but never start, and no hook runs.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

TimerCallback = Callable[[], "float | Awaitable[float | None] | None"]
Hook = Callable[[], "object | Awaitable[object]"]


class Timer:
    """One ``module.add_timer`` timer; :meth:`stop` cancels it (also when it is running)."""

    __slots__ = (
        "_callback",
        "_delay",
        "_handle",
        "_logger",
        "_loop",
        "_task",
        "_timers",
        "stopped",
    )

    def __init__(
        self, delay: float, callback: TimerCallback, logger: logging.Logger, timers: set[Timer]
    ) -> None:
        self._delay = delay
        self._callback = callback
        self._logger = logger
        self._timers = timers  # the owning module's live timers; a timer leaves it once done
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._task: asyncio.Future[Any] | None = None
        self.stopped = False

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Schedule the first call on *loop* (done at once when a loop is running)."""
        if self._loop is None and not self.stopped:
            self._loop = loop
            self._handle = loop.call_later(self._delay, self._fire)

    def stop(self) -> None:
        self.stopped = True
        self._timers.discard(self)
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def _fire(self) -> None:
        self._handle = None
        try:
            result = self._callback()
        except Exception:
            self._logger.exception("timer %s failed; it is stopped", _name(self._callback))
            self.stop()
            return
        if inspect.isawaitable(result):
            self._task = asyncio.ensure_future(result)
            self._task.add_done_callback(self._after_async)
        else:
            self._again(result)

    def _after_async(self, task: asyncio.Future[Any]) -> None:
        self._task = None
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            self._logger.error(
                "timer %s failed; it is stopped",
                _name(self._callback),
                exc_info=(type(error), error, error.__traceback__),
            )
            self.stop()
            return
        self._again(task.result())

    def _again(self, result: object) -> None:
        if self.stopped or self._loop is None:
            return
        if type(result) in (int, float) and result >= 0:  # type: ignore[operator]
            self._delay = float(result)  # type: ignore[arg-type]
            self._handle = self._loop.call_later(self._delay, self._fire)
        else:
            self.stop()


def start_timers(timers: Iterable[Timer], loop: asyncio.AbstractEventLoop) -> None:
    """Start timers that were added while no loop was running (e.g. by a test kit)."""
    for timer in list(timers):
        timer.start(loop)


def run_ready_hooks(hooks: Iterable[tuple[Hook, logging.Logger]]) -> list[asyncio.Task[Any]]:
    """Call every ``on_ready`` hook; async ones go on as tasks (the worker serves meanwhile)."""
    tasks: list[asyncio.Task[Any]] = []
    for hook, logger in hooks:
        try:
            result = hook()
        except Exception:
            logger.exception("ready hook %s failed", _name(hook))
            continue
        if inspect.isawaitable(result):
            task = asyncio.ensure_future(result)
            task.add_done_callback(_log_failure(logger, "ready hook", hook))
            tasks.append(task)
    return tasks


async def run_unload_hooks(hooks: Iterable[tuple[Hook, logging.Logger]], timeout: float) -> None:
    """Call every ``on_unload`` hook, in order, each awaited for at most what remains of
    *timeout* seconds (a hook that overruns is cancelled and logged; the stop goes on)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    for hook, logger in hooks:
        try:
            result = hook()
            if inspect.isawaitable(result):
                await asyncio.wait_for(result, max(0.0, deadline - loop.time()))
        except TimeoutError:
            logger.error("unload hook %s did not finish within %gs", _name(hook), timeout)
        except Exception:
            logger.exception("unload hook %s failed", _name(hook))


def _log_failure(
    logger: logging.Logger, what: str, fn: Callable[..., Any]
) -> Callable[[asyncio.Future[Any]], None]:
    def done(task: asyncio.Future[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            error = task.exception()
            assert error is not None
            logger.error(
                "%s %s failed", what, _name(fn), exc_info=(type(error), error, error.__traceback__)
            )

    return done


def _name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)
