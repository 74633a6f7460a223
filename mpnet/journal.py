"""Persistence of the shared tables: a snapshot plus an append-only checksummed journal,
written by the master only."""

from __future__ import annotations

import logging
import os
import time
import zlib
from pathlib import Path
from typing import Any

from .pure.frames import MAX_FRAME, ChannelError, decode_payload, encode
from .pure.replica import WRITE_ARITY, apply_write

log = logging.getLogger("mpnet.shared")

_MAGIC = b"MPNETSNAP2\n"  # 2: msgpack bodies
_COMPACT_BYTES = 64 * 1024 * 1024


class StateFileError(Exception):
    """The state file or journal cannot be trusted; the message says where."""


class Store:
    """Snapshot plus append-only checksummed journal for the master's tables.

    Journal record: 4-byte length, 4-byte CRC32 of the payload, payload (``encode`` of
    ``[table, op, args]`` without its frame header). A record cut short at the very end (the master
    died mid-write) is dropped on load; a bad record followed by more data is corruption, and the
    service refuses to start rather than serve half a state.
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
            good_end, count = replay_journal(data, tables, str(self.journal_path))
            if good_end < len(data):
                log.warning(
                    "%s: dropped an incomplete last record (%d bytes) left by a crash",
                    self.journal_path,
                    len(data) - good_end,
                )
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


def replay_journal(data: bytes, tables: dict[str, dict[Any, Any]], where: str) -> tuple[int, int]:
    """Apply journal *data* to *tables*; return (end of the last good record, records applied).

    Pure, so the three cases (clean, cut short at the end, corrupt in the middle) are tested with
    bytes alone.
    """
    pos = count = 0
    while pos < len(data):
        if len(data) - pos < 8:
            return pos, count  # header cut short: the tail of a crashed write
        length = int.from_bytes(data[pos : pos + 4], "big")
        checksum = int.from_bytes(data[pos + 4 : pos + 8], "big")
        end = pos + 8 + length
        if end > len(data):
            # Either the body of the last record was cut short by a crash, or the length field
            # of a record in the middle is damaged. Only the latter leaves whole records after.
            if length > MAX_FRAME or _next_record(data, pos + 1) is not None:
                raise StateFileError(
                    f"{where}: corrupt record at byte {pos} (length {length} runs past the end "
                    f"of the file, but intact records follow); refusing to load a partial "
                    f"state (move the file away to start empty)"
                )
            return pos, count  # body cut short at the end
        payload = data[pos + 8 : end]
        if zlib.crc32(payload) != checksum:
            if end == len(data) and _next_record(data, pos + 1) is None:
                return pos, count  # a torn last write: the tail of a crash, like a short one
            raise StateFileError(
                f"{where}: corrupt record at byte {pos} (checksum mismatch) with "
                f"{len(data) - end} more byte(s) after it; refusing to load a partial state "
                f"(move the file away to start empty)"
            )
        try:
            name, op, args = decode_payload(payload)
            apply_write(tables.setdefault(name, {}), op, args)
        except (ChannelError, ValueError, TypeError, IndexError, KeyError) as exc:
            raise StateFileError(f"{where}: undecodable record at byte {pos}: {exc}") from None
        pos = end
        count += 1
    return pos, count


def _next_record(data: bytes, start: int) -> int | None:
    """The offset of the first intact, decodable journal record at or after *start*, or None.

    Used only when a record's length runs past the end of the file, to tell a crash's torn tail
    (nothing intact after it) from a damaged length field in the middle. A torn tail is shorter
    than one record, so a longer remainder is corruption without a scan.
    """
    if len(data) - start > MAX_FRAME + 8:
        return start  # too long to be a torn tail: treat as corruption
    crc32 = zlib.crc32
    for pos in range(start, len(data) - 8):
        length = int.from_bytes(data[pos : pos + 4], "big")
        end = pos + 8 + length
        if end > len(data) or crc32(data[pos + 8 : end]) != int.from_bytes(
            data[pos + 4 : pos + 8], "big"
        ):
            continue
        try:
            name, op, args = decode_payload(data[pos + 8 : end])
        except (ChannelError, ValueError, TypeError):
            continue
        if isinstance(name, str) and op in WRITE_ARITY and isinstance(args, list):
            return pos
    return None
