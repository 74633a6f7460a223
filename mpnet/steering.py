"""Steering new connections away from workers that cannot accept them (master side).

Each endpoint has one ``SO_REUSEPORT`` socket per worker slot (:mod:`mpnet.portmanager`), and the
kernel hashes every new connection onto one of them whether or not a worker is accepting there: a
worker stuck in a callback, a slot whose worker crashed and waits out its back-off, a slot being
removed. The master attaches a classic BPF program to each reuseport group
(``SO_ATTACH_REUSEPORT_CBPF``) that maps the flow hash onto the members whose slot is *healthy*
only, and attaches a new one whenever that set changes.

Why classic BPF: it needs no privilege (eBPF's ``SO_ATTACH_REUSEPORT_EBPF`` needs ``bpf()``,
usually ``CAP_BPF``), exists since Linux 4.5, and a program is a handful of instructions built here
in pure Python. Its one weakness: it returns a *position in the group*, not a socket, so the master
keeps a mirror of the kernel's order (:class:`GroupOrder`). The kernel appends a socket when it
starts listening and, when one closes, moves the last member into the hole (verified by
``tests/test_steering.py``). A returned position outside the group makes the kernel fall back to
its own hash: a stale program is never worse than no program.

The mirror follows the master's own closes. A socket leaves the kernel's group only when its last
descriptor closes, so the mirror is ahead of the kernel while a removed slot's worker still holds
its copy (it closes it first thing when told to stop, unless its loop is stuck). Removals from the
end of the list (``TTOU``) never move the sockets that stay, so that lag matters only if a slot is
added back (``TTIN``) while a stuck retired worker still holds the old socket: until that worker
exits, the new slot's position is off by one, and some connections go where the kernel's hash
would have sent them without steering: to the stuck worker's socket.

The same program also balances by load: when one healthy worker holds many more connections than
another (after churn, or beside a fresh replacement), the jump table repeats the positions of the
less busy ones (:func:`load_shares`), so they get more of the new connections until the gap closes.
Long-lived connections (chat, XMPP) otherwise keep the imbalance that churn left, since the hash
spreads new connections evenly whatever each worker already holds.

Pure parts (:func:`build_program`, :class:`GroupOrder`, :func:`healthy_slots`,
:func:`load_shares`) are testable without a server; :class:`Steering` is the only part that
touches sockets.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import math
import socket
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("mpnet.steering")

SO_ATTACH_REUSEPORT_CBPF = getattr(socket, "SO_ATTACH_REUSEPORT_CBPF", 51)
SO_DETACH_REUSEPORT_BPF = getattr(socket, "SO_DETACH_REUSEPORT_BPF", 68)

# Classic BPF opcodes (linux/filter.h, linux/bpf_common.h)
BPF_LD_W_ABS = 0x00 | 0x00 | 0x20  # BPF_LD | BPF_W | BPF_ABS
BPF_ALU_MOD_K = 0x04 | 0x90 | 0x00  # BPF_ALU | BPF_MOD | BPF_K
BPF_JEQ_K = 0x05 | 0x10 | 0x00  # BPF_JMP | BPF_JEQ | BPF_K
BPF_RET_K = 0x06 | 0x00  # BPF_RET | BPF_K
BPF_RET_A = 0x06 | 0x10  # BPF_RET | BPF_A
SKF_AD_OFF = -0x1000
SKF_AD_RXHASH = 32
BPF_MAXINSNS = 4096

# Jump-table entries shared out by load: an entry is 1/32 of the new connections.
LOAD_TABLE_ENTRIES = 32
# Seconds of arrivals to plan for: the counts are a heartbeat old (a quarter of stall_timeout
# by default), and the program stays until the next ones.
LOAD_HORIZON = 0.5

# TTOU: a removed slot's queue is empty for this long before its worker is told to stop (a
# handshake the kernel began before the program changed may complete a moment later).
DRAIN_QUIET = 0.3
DRAIN_MAX = 5.0

Instruction = tuple[int, int, int, int]  # code, jt, jf, k


def build_program(positions: Sequence[int]) -> list[Instruction]:
    """A reuseport program that picks one of *positions* (group positions) by flow hash.

    ``A = skb->hash % len(positions)``, then a jump table from ``0..n-1`` to the positions (or
    ``ret A`` when they are exactly ``0..n-1``). The flow hash keeps a connection's SYN and its
    retransmissions on one socket. Raises ValueError for an empty or too long list.
    """
    if not positions:
        raise ValueError("no position to steer to")
    n = len(positions)
    if 2 * n + 2 > BPF_MAXINSNS:
        raise ValueError(f"{n} positions do not fit in one classic BPF program")
    program: list[Instruction] = [(BPF_LD_W_ABS, 0, 0, (SKF_AD_OFF + SKF_AD_RXHASH) & 0xFFFFFFFF)]
    if n > 1:
        program.append((BPF_ALU_MOD_K, 0, 0, n))
    if list(positions) == list(range(n)):
        if n == 1:
            return [(BPF_RET_K, 0, 0, 0)]
        program.append((BPF_RET_A, 0, 0, 0))
        return program
    for index, position in enumerate(positions[:-1]):
        program.append((BPF_JEQ_K, 0, 1, index))  # A == index ? next : skip the return
        program.append((BPF_RET_K, 0, 0, position))
    program.append((BPF_RET_K, 0, 0, positions[-1]))
    return program


def run_program(program: Sequence[Instruction], rxhash: int) -> int:
    """Interpret *program* for a flow hash (only the opcodes :func:`build_program` emits): the
    pure check of what the kernel will do with it."""
    a = 0
    pc = 0
    while True:
        code, jt, jf, k = program[pc]
        if code == BPF_LD_W_ABS:
            a = rxhash & 0xFFFFFFFF
        elif code == BPF_ALU_MOD_K:
            a %= k
        elif code == BPF_JEQ_K:
            pc += jt if a == k else jf
        elif code == BPF_RET_K:
            return k
        elif code == BPF_RET_A:
            return a
        else:
            raise ValueError(f"opcode {code:#x} not supported here")
        pc += 1


def attach(sock: socket.socket, program: Sequence[Instruction]) -> None:
    """Attach *program* to the reuseport group of *sock* (replacing the group's program).
    Raises OSError as the kernel does (ENOPROTOOPT: too old; EINVAL, EPERM: refused)."""
    code = b"".join(struct.pack("HBBI", *insn) for insn in program)
    buffer = ctypes.create_string_buffer(code, len(code))
    fprog = struct.pack("HL", len(program), ctypes.addressof(buffer))  # struct sock_fprog
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)


def detach(sock: socket.socket) -> None:
    """Remove the group's program: the kernel's own hash again (Linux 5.3+)."""
    sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_REUSEPORT_BPF, 0)


class GroupOrder:
    """The kernel's order of one reuseport group, mirrored: a socket that starts listening is
    appended; one that closes is replaced by the last member. Members are any hashable keys."""

    def __init__(self) -> None:
        self.members: list[Any] = []

    def add(self, key: Any) -> None:
        self.members.append(key)

    def remove(self, key: Any) -> None:
        index = self.members.index(key)
        last = self.members.pop()
        if index < len(self.members):
            self.members[index] = last

    def position(self, key: Any) -> int:
        return self.members.index(key)

    def sync(self, keys: Sequence[Any]) -> None:
        """Follow a list whose gone members were closed in list order and whose new ones were
        bound in list order (how the port ledger grows and shrinks a binding)."""
        present = set(keys)
        for key in [k for k in self.members if k not in present]:
            self.remove(key)
        known = set(self.members)
        for key in keys:
            if key not in known:
                self.add(key)


def healthy_slots(workers: Iterable[Any], slots: int, stall_timeout: float, now: float) -> set[int]:
    """Slots below *slots* where some worker accepts and answered within *stall_timeout*.

    A slot whose worker is booting, crashed, stuck or draining has nobody accepting on its
    sockets (several workers share a slot only during a reload, and then the old one accepts
    until the new one is ready). *stall_timeout* 0 judges no heartbeat.
    """
    healthy = set()
    for handle in workers:
        if handle.slot >= slots or handle.state != "ready" or not handle.accepting:
            continue
        if handle.kill_at is not None:
            continue
        if stall_timeout and now - handle.last_heartbeat > stall_timeout:
            continue
        healthy.add(handle.slot)
    return healthy


def load_shares(
    connections: dict[int, int], arriving: float, margin: int, skewed: bool
) -> dict[int, int] | None:
    """How many of :data:`LOAD_TABLE_ENTRIES` jump-table entries each slot gets, by the
    *connections* each slot holds; None: an even spread (the kernel's hash).

    Balancing starts when the busiest slot holds more than *margin* connections above the least
    busy one and, once *skewed*, stops when the gap is back within half of it (the counts come
    with heartbeats, so they lag; the hysteresis keeps the program from flapping). The
    *arriving* connections expected before the counts are fresh again are poured into the
    least busy slots, water-filling: a trickle all goes to the lightest, a burst (a reconnect
    storm) fills the gap and the rest is spread, so the program does not overshoot by sending a
    whole storm to one worker. Every slot keeps at least one entry. *margin* 0: off.
    """
    if margin <= 0 or len(connections) < 2:
        return None
    held = sorted(connections.values())
    if held[-1] - held[0] <= (margin // 2 if skewed else margin):
        return None
    remaining, level = max(1.0, arriving), float(held[0])
    for filled in range(1, len(held) + 1):
        ceiling = held[filled] if filled < len(held) else math.inf
        room = (ceiling - level) * filled
        if room >= remaining:
            level += remaining / filled
            break
        remaining -= room
        level = ceiling
    poured = {slot: max(0.0, level - count) for slot, count in connections.items()}
    total = sum(poured.values())
    return {
        slot: max(1, round(LOAD_TABLE_ENTRIES * amount / total)) for slot, amount in poured.items()
    }


class ArrivalRate:
    """New connections per second across the workers, smoothed over :data:`LOAD_HORIZON`, from
    the ``served`` totals their heartbeats report (a replacement worker starts from zero)."""

    def __init__(self) -> None:
        self.per_second = 0.0
        self._served: dict[int, int] = {}
        self._at: float | None = None

    def update(self, served: dict[int, int], now: float) -> float:
        """*served*: worker pid -> connections it accepted so far."""
        new = sum(count - self._served.get(pid, 0) for pid, count in served.items())
        if self._at is not None and now > self._at:
            elapsed = now - self._at
            weight = min(1.0, elapsed / LOAD_HORIZON)
            self.per_second += weight * (max(0, new) / elapsed - self.per_second)
        self._served, self._at = dict(served), now
        return self.per_second


def queued(sock: socket.socket) -> int:
    """Connections waiting in a listening socket's accept queue (``tcpi_unacked`` of a
    listener is its ``sk_ack_backlog``); 0 if it cannot be read."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    except OSError:
        return 0
    if len(info) < 32:
        return 0
    return struct.unpack_from("I", info, 24)[0]  # after 8 bytes of u8 and 4 u32s: tcpi_unacked


@dataclass
class _Group:
    binding: Any
    order: GroupOrder = field(default_factory=GroupOrder)
    attached: tuple[int, ...] | None = None  # positions of the program in force; None: none


class Steering:
    """Keeps each reuseport group's program in step with the healthy slots (see the module
    docstring). :meth:`update` is cheap when nothing changed; the first refusal by the kernel is
    logged once and turns steering off for the life of the master: mpnet then behaves as
    without it."""

    def __init__(self) -> None:
        self.available = True
        self._groups: dict[int, _Group] = {}
        self._noted_adopted = False
        self._probed = False
        self._draining: dict[int, tuple[float, float]] = {}  # slot -> (steered at, quiet since)

    def update(
        self, bindings: Iterable[Any], healthy: set[int], shares: dict[int, int] | None = None
    ) -> None:
        """Attach, to every group, a program choosing only sockets of *healthy* slots, each as
        often as its entry in *shares* says (:func:`load_shares`; None: evenly); detach when every
        slot is healthy and evenly chosen, or none is healthy (the kernel's hash: as without
        steering)."""
        seen = set()
        for binding in bindings:
            if binding.adopted:
                self._note_adopted()
                continue
            if not self.available or not binding.sockets:
                continue
            if not self._probed:
                self._probe(binding)
                if not self.available:
                    continue
            seen.add(id(binding))
            group = self._groups.get(id(binding))
            if group is None or group.binding is not binding:
                group = self._groups[id(binding)] = _Group(binding)
            group.order.sync(binding.sockets)
            chosen = sorted(
                (group.order.position(sock), slot)
                for slot, sock in enumerate(binding.sockets)
                if slot in healthy
            )
            everyone = len(chosen) == len(group.order.members) and shares is None
            positions = tuple(
                position
                for position, slot in chosen
                for _ in range(shares.get(slot, 1) if shares else 1)
            )
            wanted = None if not positions or everyone else positions
            if wanted == group.attached:
                continue
            self._apply(binding, group, wanted)
        for key in [k for k in self._groups if k not in seen]:
            del self._groups[key]  # released bindings (closed sockets)

    def _probe(self, binding: Any) -> None:
        """Learn at once whether the kernel takes a program (not at the first stall or
        ``TTOU``, when the answer decides how workers are removed)."""
        self._probed = True
        sock = binding.sockets[0]
        try:
            attach(sock, build_program(range(len(binding.sockets))))
            detach(sock)
        except OSError as exc:
            self._refused(binding, exc)

    def _refused(self, binding: Any, exc: BaseException) -> None:
        self.available = False
        for group in self._groups.values():  # no program left behind that is not kept up
            if group.attached is not None and group.binding.sockets:
                with contextlib.suppress(OSError):
                    detach(group.binding.sockets[0])
                group.attached = None
        log.warning(
            "steering off: the kernel refused a reuseport BPF program on %s (%s); a stalled "
            "worker keeps receiving new connections, and removing workers relies on "
            "net.ipv4.tcp_migrate_req",
            binding.address,
            exc,
        )

    def _apply(self, binding: Any, group: _Group, wanted: tuple[int, ...] | None) -> None:
        sock = binding.sockets[0]
        try:
            if wanted is None:
                try:
                    detach(sock)
                except OSError as exc:
                    if exc.errno != errno.ENOENT:  # ENOENT: nothing was attached
                        attach(sock, build_program(range(len(group.order.members))))
            else:
                attach(sock, build_program(wanted))
        except (OSError, ValueError) as exc:
            self._refused(binding, exc)
            return
        group.attached = wanted
        log.debug("steering %s: positions %s", binding.address, wanted or "all (kernel hash)")

    def _note_adopted(self) -> None:
        if not self._noted_adopted:
            self._noted_adopted = True
            log.info(
                "steering off for socket-activated endpoints: one socket shared by every "
                "worker, whose idle workers take what a stalled one does not"
            )

    def drained(self, slot: int, bindings: Iterable[Any], now: float | None = None) -> bool:
        """For a slot being removed (steered away from already): True once its sockets' accept
        queues stayed empty for :data:`DRAIN_QUIET`, or after :data:`DRAIN_MAX`, or at once
        without steering. Its worker keeps accepting until then, so nothing is reset."""
        if not self.available:
            return True
        now = time.monotonic() if now is None else now
        started, quiet_since = self._draining.setdefault(slot, (now, now))
        waiting = sum(
            queued(binding.sockets[slot])
            for binding in bindings
            if not binding.adopted and slot < len(binding.sockets)
        )
        if waiting:
            quiet_since = now
        self._draining[slot] = (started, quiet_since)
        done = now - quiet_since >= DRAIN_QUIET or now - started >= DRAIN_MAX
        if done:
            del self._draining[slot]
        return done

    def keep_drains_below(self, slots: int) -> None:
        """Forget drains of slots that are wanted again (``TTIN`` after ``TTOU``)."""
        for slot in [s for s in self._draining if s < slots]:
            del self._draining[slot]
