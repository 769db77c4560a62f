"""uvicorn's h11 HTTP protocol with a header timeout.

uvicorn closes idle keep-alive connections (--timeout-keep-alive) but waits forever for the
headers of a request that trickle in a byte at a time, so a few hundred such connections would
hold the server's sockets. Here each request's headers must be complete within `header_timeout`
seconds of the connection opening, or of the first byte of the next request on a kept-alive
connection (an idle one is closed by the keep-alive timeout); the body has its own limit
(api_server.Limits.body_timeout).
"""
from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def protocol_with_header_timeout(header_timeout: float) -> type[H11Protocol]:
    class HeaderTimeoutH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._header_timer is None and self.conn.their_state is h11.IDLE:
                self._arm()
            super().data_received(data)

        def handle_events(self) -> None:
            super().handle_events()
            if self.conn.their_state is not h11.IDLE:  # the headers are in
                self._disarm()

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutH11Protocol
