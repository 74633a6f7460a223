"""The worker's end of the master <-> worker channel, as an asyncio protocol."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from mpnet.pure.frames import MAX_FRAME, ChannelError, FrameDecoder, encode


class WorkerChannel(asyncio.Protocol):
    """The worker's end of the channel, as an asyncio protocol on the worker's event loop.

    Incoming messages are handed to ``on_message``; a broken stream or the master going away
    calls ``on_lost`` (the worker then exits: without its master it must not keep serving).
    """

    def __init__(self, on_message: Callable[[Any], None], on_lost: Callable[[str], None]) -> None:
        self._on_message = on_message
        self._on_lost = on_lost
        self._decoder = FrameDecoder()
        self._pending = bytearray()  # frames sent in this pass of the loop, written at its end
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._loop = asyncio.get_running_loop()

    def data_received(self, data: bytes) -> None:
        try:
            messages = self._decoder.feed(data)
        except ChannelError as exc:
            self._on_lost(f"malformed message from master: {exc}")
            return
        for message in messages:
            self._on_message(message)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._pending.clear()
        self._on_lost(f"channel to master closed ({exc or 'EOF'})")

    def send(self, message: Any, limit: int = MAX_FRAME) -> None:
        """Queue *message*; every message sent in one pass of the event loop leaves in one
        write at the end of that pass (one wake-up of the master instead of one each). A frame
        above *limit* raises ChannelError here, before anything is queued."""
        if self.transport is None:
            return
        frame = encode(message, limit)
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending += frame

    def flush(self) -> None:
        """Write what is queued now (also called by the loop at the end of a pass)."""
        data, self._pending = self._pending, bytearray()
        if data and self.transport is not None:
            self.transport.write(data)
