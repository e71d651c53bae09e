"""uvicorn's httptools protocol with bounds on what one client may hold: the size and number of
a request's headers, the time to send them, and the rate of a request body.

uvicorn bounds none of these with httptools (its ``h11_max_incomplete_event_size`` applies to h11
only, and it has no read timeouts), so without them a 64 MiB header keeps the event loop busy for
seconds (the parser's cost grows with the square of a header's size) and a client that sends a
byte a second holds its socket and its request for as long as it likes. Here:

- the request line and headers may take at most ``max_head_bytes`` and ``max_headers`` headers:
  more is answered with 431 before the rest is parsed, and the connection is closed;
- they must arrive within ``head_timeout`` seconds of the connection (or of the previous
  response, on a kept-alive connection): a slower client gets 408 and is disconnected;
- a body must keep coming at ``body_min_rate`` bytes a second or more, measured over each
  ``body_timeout`` seconds (time the gateway itself is not reading does not count): a slower
  client is disconnected.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from adapterdeck.serve.settings import HttpSettings

logger = logging.getLogger("adapterdeck.serve")

_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


def guarded_protocol(limits: HttpSettings) -> type[asyncio.Protocol]:
    """The protocol class to give ``uvicorn.run(http=...)``, bounded by ``limits``."""

    class Guarded(GuardedHttpToolsProtocol):
        settings = limits

    return Guarded


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    settings: HttpSettings = HttpSettings()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True
        self._head_bytes = 0
        self._header_count = 0
        self._refusal: tuple[int, str] | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._body_bytes = 0
        self._body_checked = 0

    # -- the request head ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.settings.head_timeout, self._head_timed_out)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._in_head and not self.transport.is_closing():
            self._refuse(408, f"the request headers did not arrive within {self.settings.head_timeout:g} s")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._head_bytes, self._header_count = True, 0, 0
        self._arm_head_timer()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self.settings.max_headers:
            self._refusal = (431, f"more than {self.settings.max_headers} request headers")
            raise _Refused
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().on_headers_complete()
        self._body_bytes = self._body_checked = 0
        if self._body_timer is None:
            self._body_timer = self.loop.call_later(self.settings.body_timeout, self._check_body_rate)

    def data_received(self, data: bytes) -> None:
        if self._in_head and self._head_bytes + len(data) > self.settings.max_head_bytes:
            # Feed only what the head may still take; the rest only once the head is complete.
            room = self.settings.max_head_bytes - self._head_bytes
            self._feed(data[:room])
            if self.transport.is_closing():
                return
            if self._in_head:
                limit = self.settings.max_head_bytes
                self._refuse(431, f"the request headers are larger than {limit:,} bytes")
                return
            data = data[room:]
        elif self._in_head:
            self._head_bytes += len(data)
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        super().data_received(data)  # a parse error (a bound crossed in a callback too): send_400_response

    def send_400_response(self, msg: str) -> None:
        if self._refusal is not None:  # a bound was crossed inside a parser callback
            status, why = self._refusal
            self._refuse(status, why)
            return
        super().send_400_response(msg)

    def _refuse(self, status: int, why: str) -> None:
        logger.warning("refused %s: %s (%d)", self._who(), why, status)
        message = f"{why}.".encode()
        if self.cycle is None or self.cycle.response_complete:
            self.transport.write(
                b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n"
                b"connection: close\r\n\r\n%s" % (status, _REASONS[status], len(message), message)
            )
        self.transport.close()
        self._stop_timers()

    # -- the request body ------------------------------------------------------------------------

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        super().on_body(body)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _check_body_rate(self) -> None:
        self._body_timer = None
        if self.transport.is_closing() or self.cycle is None or not self.cycle.more_body:
            return
        period = self.settings.body_timeout
        arrived = self._body_bytes - self._body_checked
        self._body_checked = self._body_bytes
        # While the gateway is not reading (its buffer is full), a slow body is not the client's doing.
        if not self.flow.read_paused and arrived < self.settings.body_min_rate * period:
            logger.warning(
                "disconnected %s: its request body came at %d bytes in %g s (at least %d bytes/s needed)",
                self._who(),
                arrived,
                period,
                self.settings.body_min_rate,
            )
            self.transport.close()
            return
        self._body_timer = self.loop.call_later(period, self._check_body_rate)

    def _who(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else "a client"

    def _stop_timers(self) -> None:
        for timer in (self._head_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._body_timer = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timers()
        super().connection_lost(exc)


class _Refused(Exception):
    """Raised in a parser callback when a bound is crossed; httptools reports it as a parse error."""
