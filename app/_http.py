"""uvicorn's httptools protocol with a bounded request head: size, header count and time to receive it.

httptools itself buffers a request line and header section of any size for as
long as the client cares to send it, so one unauthenticated connection could
grow the process by hundreds of megabytes, and a few hundred half-sent requests
could hold every file descriptor. This subclass keeps the fast parser and
adds what uvicorn's ``h11`` mode has, plus a deadline:

- the head (request line and headers) over ``config.h11_max_incomplete_event_size``
  bytes, or with more than :data:`MAX_HEADERS` header lines, is answered
  ``431 Request Header Fields Too Large`` and the connection closed;
- a head not complete ``config.timeout_keep_alive`` seconds after the
  connection opened (or its first byte arrived, on a kept-alive connection)
  is answered ``408`` and the connection closed.

Body size is the app's business (``server.maxBodyBytes``).
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["MAX_HEAD_BYTES", "MAX_HEADERS", "BoundedHttpToolsProtocol"]

MAX_HEAD_BYTES = 64 * 1024  # nginx's default allows 4 x 8 KiB lines; browsers send a few KiB
MAX_HEADERS = 100


class HeadTooLarge(Exception):
    """Raised from a parser callback to stop parsing a head over the limits."""


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """:class:`HttpToolsProtocol` that refuses an oversized or slow request head (431 / 408, then close)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._max_head_bytes: int = self.config.h11_max_incomplete_event_size or MAX_HEAD_BYTES
        self._head_bytes = 0  # received while the current head is incomplete
        self._header_count = 0
        self._awaiting_head = True
        self._head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._awaiting_head:
            self._head_bytes += len(data)
        super().data_received(data)  # a HeadTooLarge from a callback comes back as send_400_response
        if self._awaiting_head and self._head_bytes > self._max_head_bytes and not self.transport.is_closing():
            self._refuse(431, "Request Header Fields Too Large")

    def send_400_response(self, msg: str) -> None:
        if self._head_bytes > self._max_head_bytes or self._header_count > MAX_HEADERS:
            self._refuse(431, "Request Header Fields Too Large")  # our callback stopped the parser
        else:
            super().send_400_response(msg)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._awaiting_head = True
        self._header_count = 0
        self._arm_head_deadline()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > MAX_HEADERS:
            raise HeadTooLarge
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._awaiting_head = False
        self._head_bytes = 0
        self._disarm_head_deadline()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._awaiting_head = True  # what arrives next is the next request's head (its deadline starts with it)

    def _arm_head_deadline(self) -> None:
        if self._head_deadline is None:
            self._head_deadline = self.loop.call_later(self.config.timeout_keep_alive, self._head_timed_out)

    def _disarm_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if self._awaiting_head and not self.transport.is_closing():
            # an idle keep-alive connection (nothing sent yet) is just closed, a half-sent head is told why
            if self._head_bytes:
                self._refuse(408, "Request Timeout")
            else:
                self.transport.close()

    def _refuse(self, status: int, reason: str) -> None:
        """Answer ``status`` with a short text body and close the connection."""
        self._disarm_head_deadline()
        if self.transport.is_closing():
            return
        body = reason.encode("ascii")
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n%s" % (status, reason.encode("ascii"), len(body), body)
        )
        self.transport.close()
