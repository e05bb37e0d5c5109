"""Connection limits for the HTTP servers this project runs (our OpenAI server and the Gradio
app, both on uvicorn): normal clients get through whatever a few slow or many idle
connections do.

- A request's head must arrive within HEAD_TIMEOUT_S of its first byte (uvicorn waits for a
  half-sent head for ever: slowloris).
- One client address holds at most MAX_PER_CLIENT connections at once; past it, a new
  connection is closed at once (1,100 slow connections from one address used up a 1,024-file
  limit: every other client's request failed).
- The process may open as many files as its hard limit allows (the soft limit is raised).

`install()` puts the guarded protocol in place of uvicorn's (httptools, its fast parser, which
the project's requirements bring), before a server is configured; uvicorn takes protocols by
name, and Gradio builds its own uvicorn configuration, so this is done where uvicorn looks them
up (`uvicorn.config.HTTP_PROTOCOLS`).
"""
from __future__ import annotations

import os
from typing import Any

HEAD_TIMEOUT_S = float(os.environ.get("CHAT_HEAD_TIMEOUT_S", "10"))
MAX_PER_CLIENT = int(os.environ.get("CHAT_MAX_CONNECTIONS_PER_CLIENT", "256"))
_open: dict[str, int] = {}  # client address -> connections open now (one event loop per server)


def _guarded() -> type:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class GuardedHttpTools(HttpToolsProtocol):
        """uvicorn's httptools protocol with a head timeout and a per-address connection cap."""

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            peer = transport.get_extra_info("peername")
            self._guard_ip = peer[0] if peer else "-"
            self._guard_timer = None
            _open[self._guard_ip] = _open.get(self._guard_ip, 0) + 1
            if _open[self._guard_ip] > MAX_PER_CLIENT:
                transport.abort()  # connection_lost follows and counts it out
                return
            self._arm()

        def _arm(self) -> None:
            if self._guard_timer is not None:
                self._guard_timer.cancel()
            self._guard_timer = self.loop.call_later(HEAD_TIMEOUT_S, self._head_late)

        def _head_late(self) -> None:
            self._guard_timer = None
            if self.transport is not None and not self.transport.is_closing():
                self.transport.close()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()  # each request on a kept-alive connection has its own time for its head

        def on_headers_complete(self) -> None:
            if self._guard_timer is not None:
                self._guard_timer.cancel()
                self._guard_timer = None
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            if getattr(self, "_guard_timer", None) is not None:
                self._guard_timer.cancel()
            ip = getattr(self, "_guard_ip", None)
            if ip is not None:
                left = _open.get(ip, 1) - 1
                if left > 0:
                    _open[ip] = left
                else:
                    _open.pop(ip, None)
            super().connection_lost(exc)

    return GuardedHttpTools


_installed = False


def install() -> None:
    """Guard every uvicorn server this process starts from now on; raise the open-files limit."""
    global _installed
    if _installed:
        return
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass
    try:
        import uvicorn.config

        guarded = _guarded()
    except ImportError:  # no httptools: uvicorn's h11 protocol as it is
        return
    globals()["GuardedHttpTools"] = guarded
    for name in ("auto", "httptools"):
        uvicorn.config.HTTP_PROTOCOLS[name] = f"{__name__}:GuardedHttpTools"
    _installed = True
