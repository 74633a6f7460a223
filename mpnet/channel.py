"""The master's end of the master <-> worker channel: a small non-blocking transport around
the pure frame codec (:mod:`mpnet.pure.frames`), used from the master's select loop."""

from __future__ import annotations

import socket
from typing import Any

from .pure.frames import FrameDecoder, encode

RECV_SIZE = 256 * 1024


class MasterChannel:
    """The master's end of one worker's channel: non-blocking, buffered, used from a select loop.

    The master never blocks on a worker: ``send`` queues and writes what the socket takes now;
    the rest goes out when the selector reports the socket writable (``flush``). If a worker
    stops reading and its queue passes ``max_backlog`` bytes, ``send`` drops the queue and sets
    ``failed`` to the reason; the master checks it once per loop and cuts that worker off rather
    than grow without bound.
    """

    def __init__(self, sock: socket.socket, max_backlog: int = 256 * 1024 * 1024) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._fd = sock.fileno()  # stays valid as a selector key after close
        self._decoder = FrameDecoder()
        # recv_into one buffer: a fresh RECV_SIZE bytes object per recv costs an mmap, an
        # mremap and a munmap, more than the recv itself for a small message.
        self._view = memoryview(bytearray(RECV_SIZE))
        self._out = bytearray()
        self._max_backlog = max_backlog
        self.closed = False
        self.failed: str | None = None

    def fileno(self) -> int:
        return self._fd

    def send(self, message: Any) -> None:
        self.send_frame(encode(message))

    def send_frame(self, frame: bytes) -> None:
        """Queue an already encoded frame (a broadcast is encoded once for every worker)."""
        if self.closed or self.failed:
            return
        self._out += frame
        if len(self._out) > self._max_backlog:
            self.failed = f"it is not reading its channel ({len(self._out)} bytes queued)"
            self._out.clear()
            return
        self.flush()

    def flush(self) -> None:
        """Write as much of the queue as the socket takes without blocking."""
        while self._out and not self.closed:
            try:
                sent = self.sock.send(self._out)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.close()
                return
            del self._out[:sent]

    @property
    def wants_write(self) -> bool:
        return bool(self._out) and not self.closed

    def receive(self) -> list[Any] | None:
        """Read what is available; return the complete messages, or None once the peer is gone.

        Raises ChannelError for a malformed stream.
        """
        messages: list[Any] = []
        view = self._view
        while True:
            try:
                size = self.sock.recv_into(view)
            except (BlockingIOError, InterruptedError):
                return messages
            except OSError:
                size = 0
            if not size:
                return messages or None
            messages.extend(self._decoder.feed(view[:size]))
            if size < RECV_SIZE:
                return messages  # drained: no need for a recv that fails with EAGAIN

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.sock.close()
