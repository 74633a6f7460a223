"""Reloads: check the new modules beside the master's loop, start a new generation, roll back.

A reload goes through three steps, each driven by the master's loop through :class:`Reloads`:

1. *Checking.* The config is read again and a checker process loads the modules
   (:mod:`mpnet.checker`). Its pipe is one more descriptor in the master's selector, so the loop
   keeps serving while it loads. A reload asked for meanwhile (or during start-up, or while an
   accepted reload still replaces the workers) is queued: however many arrive, one more runs
   once the running one is done, reading the files again.
2. *Replacing.* A good check plans the ports, and the master adopts the new config under a new
   generation number; its reconcile replaces the workers one slot at a time.
3. *Complete, or rolled back.* Once the new generation serves every slot, the reload is
   complete. If one of its workers fails before it is ready, the previous config and generation
   (whose workers still serve) come back, and the new generation's workers drain.

A control client waiting for a reload (a :class:`~mpnet.control.Deferred`) gets the check's
outcome. Like the master, this class never runs user code: only the checker loads modules.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from .checker import Check, CheckFailed
from .control import Deferred
from .portmanager import PortConflict, PortLedger, plan_services
from .pure.config import Config, ConfigError
from .pure.controlproto import ControlReply
from .pure.portplan import ServicePlan

log = logging.getLogger("mpnet.reload")


class ReloadHost(Protocol):
    """What a reload needs of the master (:class:`mpnet.master.Master` is one).

    ``config``, ``slots`` and ``generation`` are the master's desired state: read here, changed
    only through :meth:`adopt`.
    """

    config: Config
    slots: int
    generation: int

    def start_checker(self, config: Config) -> Check:
        """Fork a checker for *config*, holding none of the master's sockets, and watch its
        pipe: the loop calls :meth:`Reloads.on_readable` when it can be read. May raise
        OSError."""
        ...

    def stop_watching(self, check: Check) -> None:
        """Take the checker's pipe out of the loop (the checker is reaped like any child)."""
        ...

    def adopt(self, config: Config, slots: int, generation: int) -> None:
        """Serve *config* with *slots* workers of *generation* from now on (its log settings
        too). The ports are already in the ledger."""
        ...

    def retire_generation(self, generation: int, why: str) -> None:
        """Drain every active worker of *generation*."""
        ...

    def has_outdated(self) -> bool:
        """Whether an active worker is still to be replaced (older generation, or recycled)."""
        ...

    def notify_reloading(self) -> None:
        """Tell systemd a reload began (RELOADING=1)."""
        ...

    def notify_ready(self, failure: str | None = None) -> None:
        """Tell systemd the service is ready (READY=1); after a failed reload, say why."""
        ...


@dataclass
class PendingReload:
    """A reload whose modules are being checked: its config, the checker (polled by the
    master's loop) and the control clients waiting for the outcome."""

    config: Config
    check: Check
    waiters: list[Deferred]


@dataclass
class Rollback:
    """What a reload replaced, restored if the new generation's workers fail to start."""

    config: Config
    slots: int
    generation: int
    plans: list[ServicePlan]


class Reloads:
    """The reload state machine: at most one check running, at most one reload queued after
    it, and the rollback of the reload whose generation is replacing the workers.

    The master calls :meth:`request` (SIGHUP, ``mpnet reload``), :meth:`on_readable` (the
    checker's pipe), :meth:`tick` (each housekeeping pass), :meth:`roll_back` (a worker of the
    new generation failed before it was ready), :meth:`complete` (the new generation serves
    every slot), :meth:`cancel` (the service stops) and :meth:`close` (the master exits).
    Everything else it asks of the master goes through :class:`ReloadHost`.
    """

    def __init__(
        self,
        host: ReloadHost,
        ledger: PortLedger,
        read_config: Callable[[], Config] | None,
    ) -> None:
        self._host = host
        self._ledger = ledger
        self._read_config = read_config  # returns a fresh Config
        self._pending: PendingReload | None = None  # a check in progress
        self._queued: list[Deferred] | None = None  # one more reload after it (with waiters)
        self._coalesced = 0  # requests folded into the queued reload
        self._rollback: Rollback | None = None  # while a reload replaces workers
        self._issued = 1  # generation numbers handed out: start-up's is 1; a failed one is skipped
        self.replacing = False  # a reload's generation is replacing the workers
        self.failed: dict[str, Any] | None = None  # the last failure, for status
        self.outcomes = {"success": 0, "failure": 0}  # for mpnet_reloads_total

    @property
    def checking(self) -> bool:
        return self._pending is not None

    @property
    def deadline(self) -> float | None:
        """When the running check times out, if one runs."""
        return self._pending.check.deadline if self._pending is not None else None

    @property
    def can_roll_back(self) -> bool:
        """A reload's generation is starting and the one before it can be restored."""
        return self._rollback is not None

    def request(self, waiter: Deferred | None, running: bool) -> None:
        """Re-read config and modules; if valid, the master replaces the workers slot by slot.

        While a check runs, while a reload's generation replaces the workers, or while the
        master is not *running* yet, the reload is queued: requests that arrive meanwhile (a
        burst of SIGHUPs) make one reload, not one each. *waiter* (a control client) gets the
        check's outcome.
        """
        waiters = [waiter] if waiter is not None else []
        if self._pending is not None or self.replacing or not running:
            if self._queued is None:
                busy = (
                    "a reload's modules are checked"
                    if self._pending is not None
                    else "a reload replaces the workers"
                    if running
                    else "starting"
                )
                log.info("reload requested while %s: it follows", busy)
                self._queued = []
            else:
                self._coalesced += 1
            self._queued += waiters
            return
        self._start(waiters)

    def tick(self, running: bool) -> None:
        """A check past its deadline fails; a queued reload starts once none runs."""
        if self._pending is not None and time.monotonic() > self._pending.check.deadline:
            self._check_done(timed_out=True)
        if self._pending is None and not self.replacing and self._queued is not None and running:
            waiters, self._queued = self._queued, None
            if self._coalesced:
                log.info(
                    "%d more reload request(s) arrived meanwhile: one reload serves them all",
                    self._coalesced,
                )
                self._coalesced = 0
            self._start(waiters)

    def on_readable(self) -> None:
        """The checker's pipe is readable: take what it wrote; act once it is all there.

        The event may come from a select() whose earlier events ended the check (a control
        client's ``stop`` in the same pass): its pipe is closed then, and the event is stale.
        """
        if self._pending is not None and self._pending.check.read():
            self._check_done()

    def complete(self) -> None:
        """The reload's generation serves every slot (older workers may still drain)."""
        self.replacing = False
        self._rollback = None
        self.failed = None
        self.outcomes["success"] += 1
        log.info("reload complete: generation %d serves every slot", self._host.generation)
        self._host.notify_ready()

    def roll_back(self, reason: str) -> None:
        """A worker of the reload's generation failed before it was ready: go back to the
        previous config and generation (its workers still serve every slot the reload had not
        replaced yet, and respawn where it had), and drain the new generation's workers."""
        rollback, self._rollback = self._rollback, None
        assert rollback is not None
        host = self._host
        failed = host.generation
        log.error(
            "reload failed: generation %d did not start (%s); back to generation %d",
            failed,
            reason,
            rollback.generation,
        )
        host.adopt(rollback.config, rollback.slots, rollback.generation)
        try:
            self._ledger.apply(rollback.plans, rollback.slots)  # binds nothing: all still held
        except PortConflict as exc:
            log.error("restoring the previous port plan: %s", exc)
        host.retire_generation(failed, f"generation {failed} failed to start")
        self.replacing = host.has_outdated()
        self.failed = {"generation": failed, "error": reason}
        self.outcomes["failure"] += 1
        host.notify_ready(reason)

    def cancel(self) -> None:
        """The service stops: kill a running checker; every waiting client is told so."""
        if self._pending is not None:
            pending = self._end_check()
            pending.check.close(kill=True)
            self._queued = (self._queued or []) + pending.waiters
        for waiter in self._queued or []:
            waiter.resolve(ControlReply.failure("stopping"))
        self._queued = None
        self._coalesced = 0

    def close(self) -> None:
        """The master exits: kill a running checker and wait for it."""
        if self._pending is not None:
            self._pending.check.close(kill=True)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self._pending.check.pid, 0)

    def forget_in_child(self) -> None:
        """In a process forked by the master: close the checker's pipe."""
        if self._pending is not None:
            self._pending.check.close()

    def _start(self, waiters: list[Deferred]) -> None:
        log.info("reloading")
        self._host.notify_reloading()
        try:
            if self._read_config is None:
                raise ConfigError("no config source to re-read")
            config = self._read_config()
            check = self._host.start_checker(config)
        except (ConfigError, OSError) as exc:
            self._failed(str(exc), waiters)
            return
        self._pending = PendingReload(config, check, waiters)

    def _end_check(self) -> PendingReload:
        pending, self._pending = self._pending, None
        assert pending is not None
        self._host.stop_watching(pending.check)
        return pending  # the checker is reaped by the master, like any child

    def _check_done(self, timed_out: bool = False) -> None:
        """The checker answered (or ran out of time): plan the ports, then commit or fail."""
        pending = self._end_check()
        pending.check.close(kill=timed_out)
        host, config = self._host, pending.config
        slots = host.slots
        if config.values["workers"] != host.config.values["workers"]:
            slots = config.worker_count  # the config changed it; else keep TTIN/TTOU's count
        rollback = Rollback(host.config, host.slots, host.generation, self._ledger.plans)
        try:
            if timed_out:
                raise pending.check.timed_out()
            report = pending.check.result()
            plans = plan_services(config, report["services"])
            self._ledger.apply(plans, slots)
        except (CheckFailed, ConfigError, PortConflict) as exc:
            self._failed(str(exc), pending.waiters)
            return
        self._issued += 1
        host.adopt(config, slots, self._issued)
        self.replacing = True
        self._rollback = rollback
        for line in self._ledger.describe():
            log.info("service %s", line)
        if report.get("redis_unreachable"):
            log.warning(
                "reload: Redis unreachable: %s; the new workers serve without it",
                report["redis_unreachable"],
            )
        message = f"reload accepted: starting generation {host.generation}"
        log.info("%s", message)
        for waiter in pending.waiters:
            waiter.resolve(ControlReply(True, message=message, generation=host.generation))

    def _failed(self, reason: str, waiters: list[Deferred]) -> None:
        log.error("reload failed, still serving the previous configuration: %s", reason)
        self.failed = {"generation": None, "error": reason}
        self.outcomes["failure"] += 1
        self._host.notify_ready(reason)
        for waiter in waiters:
            waiter.resolve(ControlReply.failure(f"reload failed: {reason}"))
