"""Persistence of the shared tables: a snapshot plus an append-only checksummed journal,
written by the master only."""

from __future__ import annotations

import logging
import os
import struct
import time
import zlib
from pathlib import Path
from typing import Any, NamedTuple

import msgpack

from .pure.frames import MAX_FRAME, ChannelError, decode_payload, encode, payload_stream
from .pure.replica import WRITE_ARITY, apply_write

log = logging.getLogger("mpnet.shared")

_MAGIC = b"MPNETSNAP2\n"  # 2: msgpack bodies
_COMPACT_BYTES = 64 * 1024 * 1024


class StateFileError(Exception):
    """The state file or journal cannot be trusted; the message says where."""


def _log_tail(path: Path, replay: Replay) -> None:
    if replay.tail == "torn":
        log.warning(
            "%s: dropped a torn last record at byte %d (%d bytes) left by a crash",
            path,
            replay.end,
            replay.dropped,
        )
    elif replay.tail == "zeros":
        log.warning(
            "%s: dropped %d zero bytes at the end (a file extended before a power loss)",
            path,
            replay.dropped,
        )
    elif replay.tail == "corrupt":
        log.error(
            "%s: the last record (byte %d, %d bytes) is complete but its checksum does not "
            "match: the file was damaged after it was written (not a crash); that write is "
            "dropped, although it may have been acknowledged",
            path,
            replay.end,
            replay.dropped,
        )


class Store:
    """Snapshot plus append-only checksummed journal for the master's tables.

    Journal record: 4-byte length, 4-byte CRC32 of the payload, payload (``encode`` of
    ``[table, op, args]`` without its frame header). A record cut short at the very end (the master
    died mid-write) or a zero-filled tail (a power loss) is dropped on load; a bad record followed
    by more data is corruption, and the service refuses to start rather than serve half a state
    (see :func:`replay_journal`).
    """

    def __init__(self, path: Path, fsync: str) -> None:
        self.path = path
        self.journal_path = path.with_name(path.name + ".journal")
        self.fsync = fsync
        self._journal: Any = None
        self._dirty = False
        self._last_sync = time.monotonic()
        self._journal_bytes = 0

    def load(self) -> dict[str, dict[Any, Any]]:
        tables: dict[str, dict[Any, Any]] = {}
        if self.path.exists():
            raw = self.path.read_bytes()
            if not raw.startswith(_MAGIC) or len(raw) < len(_MAGIC) + 4:
                raise StateFileError(f"{self.path}: not an mpnet state snapshot")
            body = raw[len(_MAGIC) + 4 :]
            if zlib.crc32(body) != int.from_bytes(raw[len(_MAGIC) : len(_MAGIC) + 4], "big"):
                raise StateFileError(f"{self.path}: snapshot checksum mismatch (file corrupt)")
            tables = decode_payload(body)
        good_end = 0
        if self.journal_path.exists():
            data = self.journal_path.read_bytes()
            replay = replay_journal(data, tables, str(self.journal_path))
            good_end, count = replay.end, replay.records
            _log_tail(self.journal_path, replay)
            log.info("state loaded: %d table(s), %d journal record(s)", len(tables), count)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._journal = open(self.journal_path, "ab")  # noqa: SIM115 - held for the service's life
        self._journal.truncate(good_end)
        self._journal_bytes = good_end
        return tables

    def append(self, name: str, op: str, args: list[Any]) -> None:
        payload = encode([name, op, args])[4:]
        record = len(payload).to_bytes(4, "big") + zlib.crc32(payload).to_bytes(4, "big") + payload
        self._journal.write(record)
        self._journal_bytes += len(record)
        self._dirty = True

    def commit(self) -> None:
        """Called before the master sends anything (answers, barriers, fan-out): hand every
        appended write to the OS, so that a crash of the master process never loses a write a
        worker has seen or been told is done; with ``fsync = "always"`` also fsync it, so a
        power loss does not either. The writes read in one pass of the master's loop share one
        write and one fsync."""
        if self._dirty:
            self._journal.flush()
            if self.fsync == "always":
                os.fsync(self._journal.fileno())
                self._dirty = False
            elif self.fsync == "never":
                self._dirty = False

    def tick(self, tables: dict[str, dict[Any, Any]]) -> None:
        if self._dirty and self.fsync == "everysec" and time.monotonic() - self._last_sync >= 1:
            self._journal.flush()
            os.fsync(self._journal.fileno())
            self._dirty = False
            self._last_sync = time.monotonic()
        elif self._dirty and self.fsync == "never":
            self._journal.flush()
            self._dirty = False
        if self._journal_bytes > _COMPACT_BYTES:
            self.compact(tables)

    def compact(self, tables: dict[str, dict[Any, Any]]) -> None:
        """Write a fresh snapshot atomically, then empty the journal."""
        body = encode(tables)[4:]
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as out:
            out.write(_MAGIC + zlib.crc32(body).to_bytes(4, "big") + body)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.path)
        self._journal.truncate(0)
        self._journal.flush()
        os.fsync(self._journal.fileno())
        self._journal_bytes = 0
        self._dirty = False

    def close(self, tables: dict[str, dict[Any, Any]]) -> None:
        if self._journal is not None:
            self.compact(tables)
            self._journal.close()
            self._journal = None

    def flush(self) -> None:
        if self._journal is not None:
            self._journal.flush()

    def forget(self) -> None:
        """In a forked child: close our copy of the descriptor (the buffer is empty, see
        :meth:`SharedMaster.before_fork`)."""
        if self._journal is not None:
            self._journal.close()
            self._journal = None


class Replay(NamedTuple):
    """What :func:`replay_journal` found: the end of the last good record, the records applied,
    and what was dropped after them (*tail*, ``dropped`` bytes):

    ``""``        nothing: the journal ended cleanly;
    ``"torn"``    a record cut short, or ending in a zero-filled block: a crash (or power loss)
                  in the middle of the last write;
    ``"zeros"``   zero bytes only, what ext4/XFS leave in a file extended before a power loss;
    ``"corrupt"`` a complete last record whose checksum does not match: not what a crash leaves
                  (the bytes changed after they were written), dropped, but said so loudly.
    """

    end: int
    records: int
    tail: str = ""
    dropped: int = 0


_HEADER = 8
_RECORD_HEADER = struct.Struct(">II")  # length, CRC32 of the payload
_ZERO_BLOCK = 512  # a zero run this long reaching the end of the file is a hole, not data


def replay_journal(data: bytes, tables: dict[str, dict[Any, Any]], where: str) -> Replay:
    """Apply journal *data* to *tables*; return a :class:`Replay`.

    A damaged spot followed by evidence of intact data (an intact record right where the damaged
    record's content ends) is corruption, and raises :class:`StateFileError`: the service refuses
    to serve half a state. Deciding takes one pass over the data (a bounded check per damaged
    record, no search), so a torn 30 MB record costs what reading it costs.

    Pure, so every case is tested with bytes alone.
    """
    view = memoryview(data)
    payloads: list[memoryview] = []
    replay = _check_records(data, view, payloads, where)
    _apply_records(payloads, tables, where)
    return replay


def _check_records(data: bytes, view: memoryview, payloads: list[memoryview], where: str) -> Replay:
    """Check every record's framing and checksum, collect the payloads, decide the tail."""
    pos = count = 0
    size = len(data)
    crc32 = zlib.crc32
    header = _RECORD_HEADER.unpack_from
    add = payloads.append
    while pos < size:
        if size - pos < _HEADER:
            return _dropped(data, pos, count, "torn")  # header cut short
        length, checksum = header(data, pos)
        end = pos + _HEADER + length
        if length == 0:  # no record is empty
            if _zeros_from(data, pos):
                return Replay(pos, count, "zeros", size - pos)
            raise StateFileError(
                f"{where}: corrupt record at byte {pos} (length 0, and the {size - pos} byte(s) "
                f"from there are not a zero-filled tail); refusing to load a partial state "
                f"(move the file away to start empty)"
            )
        if end > size:
            # Either the last record was cut short by a crash, or the length field of a record
            # in the middle is damaged; only the latter leaves an intact record after its content.
            if length > MAX_FRAME or _intact_record_after_content(data, pos, size):
                raise StateFileError(
                    f"{where}: corrupt record at byte {pos} (length {length} runs past the end "
                    f"of the file, but intact records follow); refusing to load a partial "
                    f"state (move the file away to start empty)"
                )
            return _dropped(data, pos, count, "torn")
        payload = view[pos + _HEADER : end]
        if crc32(payload) != checksum:
            zeros_after = end < size and _zeros_from(data, end)
            if (end == size or zeros_after) and not _intact_record_after_content(data, pos, end):
                # The last record. Torn if it ends in a never-written (zero) block or is
                # followed by one; otherwise its bytes changed after they were written.
                torn = zeros_after or _zeros_from(data, max(pos + _HEADER, end - _ZERO_BLOCK), end)
                return _dropped(data, pos, count, "torn" if torn else "corrupt")
            raise StateFileError(
                f"{where}: corrupt record at byte {pos} (checksum mismatch) with "
                f"{size - end} more byte(s) after it; refusing to load a partial state "
                f"(move the file away to start empty)"
            )
        add(payload)
        pos = end
        count += 1
    return Replay(pos, count)


def _apply_records(
    payloads: list[memoryview], tables: dict[str, dict[Any, Any]], where: str
) -> None:
    """Decode the checked payloads in one stream and apply them. On any error, decode them one
    by one to name the record (only then: it is the slow path)."""
    stream = b"".join(payloads)
    unpacker = payload_stream(len(stream))
    unpacker.feed(stream)
    applied = 0
    try:
        for name, op, args in unpacker:
            table = tables.get(name)
            if table is None:
                table = tables.setdefault(name, {})
            if op == "set" and len(args) == 2:
                table[args[0]] = args[1]
            else:
                apply_write(table, op, args)
            applied += 1
        if applied == len(payloads) and unpacker.tell() == len(stream):
            return
    except Exception:
        pass
    offset = 0
    for payload in payloads:
        try:
            name, op, args = decode_payload(bytes(payload))
            apply_write({}, op, args)
            hash(name)
        except (ChannelError, ValueError, TypeError, IndexError, KeyError) as exc:
            raise StateFileError(f"{where}: undecodable record at byte {offset}: {exc}") from None
        offset += _HEADER + len(payload)
    raise StateFileError(f"{where}: undecodable records")  # pragma: no cover - found above


def _dropped(data: bytes, pos: int, count: int, kind: str) -> Replay:
    if kind == "torn" and _zeros_from(data, pos):
        kind = "zeros"
    return Replay(pos, count, kind, len(data) - pos)


def _zeros_from(data: bytes, start: int, stop: int | None = None) -> bool:
    stop = len(data) if stop is None else stop
    return data.count(0, start, stop) == stop - start


def _intact_record_after_content(data: bytes, pos: int, stop: int) -> bool:
    """Whether the record at *pos* holds one complete msgpack value that ends before *stop* and
    is followed right there by an intact record: proof that its length field, not the end of
    the file, is what is wrong. One bounded parse, no search."""
    unpacker = msgpack.Unpacker(raw=True, strict_map_key=False, max_buffer_size=stop)
    unpacker.feed(memoryview(data)[pos + _HEADER : stop])
    try:
        unpacker.skip()
    except Exception:  # OutOfData (cut short), or bytes that are no msgpack value
        return False
    after = pos + _HEADER + unpacker.tell()
    if after >= stop or stop - after < _HEADER:
        return False
    length = int.from_bytes(data[after : after + 4], "big")
    end = after + _HEADER + length
    if length == 0 or end > len(data):
        return False
    payload = data[after + _HEADER : end]
    if zlib.crc32(payload) != int.from_bytes(data[after + 4 : after + 8], "big"):
        return False
    try:
        name, op, args = decode_payload(payload)
    except (ChannelError, ValueError, TypeError):
        return False
    return isinstance(name, str) and op in WRITE_ARITY and isinstance(args, list)
