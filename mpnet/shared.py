"""The master's side of the shared tables: the authoritative copy, one order for every write,
atomic operations decided, broadcasts fanned out, persistence through :mod:`mpnet.journal`.

The protocol is described in :mod:`mpnet.workers.shared`; the merge rules in
:mod:`mpnet.pure.replica`.
"""

from __future__ import annotations

from typing import Any

from .journal import Store
from .pure.config import Config
from .pure.frames import encode
from .pure.messages import (
    AtomicRequest,
    AtomicResult,
    Barrier,
    BarrierPassed,
    Broadcast,
    BroadcastEvent,
    ChannelError,
    Message,
    SequencedWrite,
    SharedWrite,
    to_wire,
)
from .pure.replica import WRITE_ARITY, SharedError, apply_write, run_atomic
from .pure.values import check_plain


class SharedMaster:
    """The authoritative tables in the master: sequencing, atomics, broadcasts, persistence.

    Sending: every sequenced write, broadcast and atomic answer is queued per worker, in
    sequence order, and sent once per pass of the master's loop (:meth:`tick`, called right after
    the loop has read what its workers sent): under load many messages then cost one send (one
    wake-up of the worker) instead of one each. An atomic's answer is queued after every write
    sequenced before it, so when the answer arrives the worker has all of them (the guarantee
    ``await table.incr(...)`` relies on).
    """

    def __init__(self, config: Config) -> None:
        self.tables: dict[str, dict[Any, Any]] = {}
        self.sequence = 0
        self._queued: dict[Any, list[bytes]] = {}  # channel -> frames to send at the next tick
        self.operations: dict[str, int] = {}  # by operation, for mpnet_shared_operations_total
        state_file = config["state_file"]
        self.store = (
            Store(config.resolve_path(state_file), config["state_fsync"]) if (state_file) else None
        )

    def open(self) -> None:
        if self.store is not None:
            self.tables = self.store.load()

    def close(self) -> None:
        if self.store is not None:
            self.store.close(self.tables)

    def before_fork(self) -> None:
        """Flush buffered journal bytes so the child cannot write them a second time."""
        if self.store is not None:
            self.store.flush()

    def forget_in_child(self) -> None:
        """In a forked worker: the master's journal file is not the worker's to touch."""
        if self.store is not None:
            self.store.forget()

    def tick(self) -> None:
        """Once per pass of the master's loop: send the queued frames; journal upkeep."""
        self.flush()
        if self.store is not None:
            self.store.tick(self.tables)

    def flush(self) -> None:
        """Send every queued frame (a worker that stops reading is cut off by the master)."""
        if self.store is not None:
            self.store.commit()
        queued, self._queued = self._queued, {}
        for channel, frames in queued.items():
            channel.send_frame(frames[0] if len(frames) == 1 else b"".join(frames))

    def _queue(self, channel: Any, frame: bytes) -> None:
        frames = self._queued.get(channel)
        if frames is None:
            self._queued[channel] = [frame]
        else:
            frames.append(frame)

    def handle(self, handle: Any, message: Message, channels: list[tuple[Any, Any]]) -> bool:
        """Process one shared-state message from a worker; False if it is not one."""
        if isinstance(message, SharedWrite):
            name, op, args = message
            if op not in WRITE_ARITY:
                raise ChannelError(f"bad shared write {op!r}")
            if len(args) != WRITE_ARITY[op] or (op == "update" and type(args[0]) is not dict):
                raise ChannelError(f"bad arguments for shared write {op!r}")
            check_plain(args)  # the codec decodes deeper nesting than a module may write
            # Framed before it is applied: a write whose fan-out cannot be sent is refused
            # whole (the worker checks with headroom, MAX_RELAYED_FRAME, so only a broken
            # worker sends one) rather than applied, journaled, and missing from the replicas.
            frame = _frame(SequencedWrite(handle.pid, name, op, args))
            self.operations[op] = self.operations.get(op, 0) + 1
            self._write(frame, name, op, args, channels)
        elif isinstance(message, AtomicRequest):
            request, name, op, args = message
            if not args:
                raise ChannelError("bad atomic request")
            check_plain(args)
            table = self.tables.setdefault(name, {})
            try:
                answer, effect = run_atomic(table, op, args)
            except (SharedError, TypeError, IndexError) as exc:
                self._queue(handle.channel, _frame(AtomicResult(request, False, str(exc))))
                return True
            self.operations[op] = self.operations.get(op, 0) + 1
            reply = _frame(AtomicResult(request, True, answer))
            if effect is None:
                self._queue(handle.channel, reply)
                return True
            try:
                # Origin 0: the effect is not one of the requester's pending plain writes.
                frame = _frame(SequencedWrite(0, name, effect[0], effect[1]))
            except ChannelError as exc:  # refused before anything is applied
                self._queue(handle.channel, _frame(AtomicResult(request, False, str(exc))))
                return True
            self._write(frame, name, effect[0], effect[1], channels, handle, reply)
        elif isinstance(message, Barrier):
            # Queued after every write sequenced so far, sent after the journal commit (flush).
            self._queue(handle.channel, _frame(BarrierPassed(message.request)))
        elif isinstance(message, Broadcast):
            topic, payload = message
            check_plain(payload)
            self.operations["broadcast"] = self.operations.get("broadcast", 0) + 1
            frame = _frame(BroadcastEvent(topic, payload))
            self._fan_out(frame, channels)
        else:
            return False
        return True

    def _write(
        self,
        frame: bytes,
        name: str,
        op: str,
        args: list[Any],
        channels: list[Any],
        requester: Any = None,
        reply: bytes = b"",
    ) -> None:
        """Sequence one write (*frame* is its ``SequencedWrite``): apply, journal, then queue
        it for every worker. *reply* (an atomic's answer) is queued for *requester* right after
        the effect."""
        table = self.tables.setdefault(name, {})
        apply_write(table, op, args)
        self.sequence += 1
        if self.store is not None:
            self.store.append(name, op, args)  # committed before anything is sent (flush)
        for handle, channel in channels:
            if handle is requester:
                self._queue(channel, frame + reply)  # the answer follows its effect
                reply = b""
            else:
                self._queue(channel, frame)
        if reply and requester is not None:
            self._queue(requester.channel, reply)

    def _fan_out(self, frame: bytes, channels: list[tuple[Any, Any]]) -> None:
        for _handle, channel in channels:
            self._queue(channel, frame)


def _frame(message: Message) -> bytes:
    return encode(to_wire(message))
