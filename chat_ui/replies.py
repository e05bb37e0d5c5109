"""Replies as they are written, without Gradio: which chats have one in progress (`Turns`), one
reply's text as it grows (`LiveReply`, read by the page's stream route and by the API), the
engine's stream consumed from async code (`stream_reply`, also Compare's), and what a visitor
reads when something fails.
"""
from __future__ import annotations

import asyncio
import secrets
import threading
from typing import AsyncIterator, Callable, Iterator

from loguru import logger

from infer_engine import Engine, EngineError, InvalidRequest, SamplingParams, Usage
from infer_engine.aio import ThreadedStream
from infer_engine.base import Generation
from infer_engine.errors import AuthenticationFailed, BackendUnavailable, ContextOverflow, ModelNotFound, SessionBusy

from .history import error_message, stats_line

BUSY = "A reply is still being written in this chat: wait for it to finish, or press Stop."


class Refusal(Exception):
    """A request refused before anything changed; `message` is for the visitor."""

    def __init__(self, message: str, title: str = "Error"):
        super().__init__(message)
        self.message, self.title = message, title


class Refused(Refusal):
    """A request the engine refused before anything changed (too long for the context, ...)."""

    def __init__(self, message: str):
        super().__init__(message, title="Not sent")


class NoImages(InvalidRequest):
    """An image for a model that takes only text."""


class Turns:
    """Which chats have a reply in progress: one at a time per chat. A claim is taken before
    the chat changes and held until the reply has saved, so a second Send while one streams is
    refused, readably, instead of one reply overwriting the other."""

    def __init__(self) -> None:
        self._claims: dict[str, int] = {}
        self._settled: dict[str, asyncio.Event] = {}  # set when the chat's reply has saved
        self._lock = threading.Lock()
        self._next = 0

    def claim(self, sid: str) -> int:
        with self._lock:
            if sid in self._claims:
                raise Refusal(BUSY)
            self._next += 1
            self._claims[sid] = self._next
            return self._next

    def holds(self, sid: str, claim: int | None) -> bool:
        with self._lock:
            return claim is not None and self._claims.get(sid) == claim

    def release(self, sid: str, claim: int | None = None) -> None:
        """Release `claim` (any claim of the chat when None: Stop, Clear, Undo, page closed)."""
        with self._lock:
            if claim is None or self._claims.get(sid) == claim:
                self._claims.pop(sid, None)

    def streaming(self, sid: str) -> asyncio.Event:
        """Mark the chat's reply as running; set the returned event once it has saved."""
        event = asyncio.Event()
        with self._lock:
            self._settled[sid] = event
        return event

    def done(self, sid: str, event: asyncio.Event) -> None:
        event.set()
        with self._lock:
            if self._settled.get(sid) is event:
                del self._settled[sid]

    async def settled(self, sid: str, timeout: float = 10.0) -> None:
        with self._lock:
            event = self._settled.get(sid)
        if event is not None:
            try:
                await asyncio.wait_for(event.wait(), timeout)
            except asyncio.TimeoutError:
                logger.warning("chat session={} still saving its reply after {} s", sid, timeout)

    def active(self, sid: str) -> bool:
        with self._lock:
            return sid in self._claims or sid in self._settled

    def __len__(self) -> int:
        with self._lock:
            return len(self._claims) + sum(1 for s in self._settled if s not in self._claims)


class LiveReply:
    """One chat reply as it is written. The writer (`Conversations`) appends and marks it done
    once the chat is saved; readers (`updates`) take what changed, at most once per interval.
    `token` is the reply's unguessable name: who holds it may read it (the page that sent it)."""

    def __init__(self, sid: str, base: list[dict], prefix: str = ""):
        self.token = secrets.token_urlsafe(18)
        self.sid = sid
        self.base = base        # the chat's messages before the reply (continuing: without it)
        self.prefix = prefix    # the reply being continued, if one is
        self.text = prefix
        self.stats = "…"
        self.final: list[dict] | None = None  # the chat's messages as saved, once done
        self.error: EngineError | None = None  # what ended it, if it failed
        self.notice: str | None = None  # said to the visitor when it started (the store's)
        self.done = False
        self.interrupted = False  # stopped by an action on the chat (Stop, Clear, Undo, ...)
        self.finish: str | None = None  # how it ended: stop, length, cancelled (once it has)
        self.version = 0
        self.readers = 0
        self._event = asyncio.Event()
        self._ended = asyncio.Event()

    def add(self, text: str, stats: str | None = None) -> None:
        self.text += text
        if stats is not None:
            self.stats = stats
        self._changed()

    def end(self, final: list[dict]) -> None:
        self.final, self.done = final, True
        self._ended.set()
        self._changed()

    def _changed(self) -> None:
        self.version += 1
        event, self._event = self._event, asyncio.Event()
        event.set()

    def messages(self) -> list[dict]:
        """The chat as it stands: the reply so far, or, once done, as saved."""
        if self.final is not None:
            return self.final
        return self.base + [{"role": "assistant", "content": self.text}]

    async def updates(self, interval: Callable[[], float]) -> AsyncIterator["LiveReply"]:
        """This reply each time it changed, at most once per `interval()` seconds (what arrives
        meanwhile goes out together); its end at once. Ends after the end was given."""
        loop = asyncio.get_running_loop()
        seen, shown = -1, None
        while True:
            if self.version == seen:
                if self.done:
                    return
                await self._event.wait()
                continue
            if shown is not None and not self.done:
                wait = shown + interval() - loop.time()
                if wait > 0:
                    try:
                        await asyncio.wait_for(self._ended.wait(), wait)
                    except asyncio.TimeoutError:
                        pass
            seen, shown = self.version, loop.time()
            yield self


async def stream_reply(engine: Engine, gen: Generation, sid: str) -> AsyncIterator[tuple[str, Usage | None]]:
    """The engine's stream of a prepared request, from async code: (text arrived since the last
    step, usage once known). The stream runs on a thread of its own; closing this generator
    early (Stop, page closed) stops the engine too."""
    def open_stream() -> Iterator:
        engine.wait_session_free(sid, timeout=10)  # a stopped reply may still be letting go
        return engine.stream_prepared(gen, sid)

    stream = ThreadedStream(open_stream)
    try:
        while items := await stream.take():
            usage = None
            for delta in items:
                usage = delta.usage or usage
            yield "".join(d.text for d in items), usage
    finally:
        engine.cancel(sid)


async def compare_reply(engine: Engine, messages: list[dict], gen: Generation, sid: str,
                        interval: Callable[[], float]) -> AsyncIterator[tuple[list[dict], str]]:
    """A Compare side's reply as it streams: (messages with the reply so far, stats line), at
    most once per `interval()`; a failure ends it with a notice."""
    loop = asyncio.get_running_loop()
    text, usage, shown, status = "", None, None, "ok"
    try:
        async for piece, u in stream_reply(engine, gen, sid):
            text, usage = text + piece, u or usage
            if usage is None and shown is not None and loop.time() - shown < interval():
                continue
            shown = loop.time()
            yield messages + [{"role": "assistant", "content": text}], \
                stats_line(usage, can_continue=False) if usage else "…"  # Compare has no Continue
    except EngineError as exc:
        status = f"{type(exc).__name__}: {exc.message}"
        kept = [{"role": "assistant", "content": text}] if text else []
        yield messages + kept + [error_message(visitor_message(exc))], stats_error(exc)
    finally:
        log_reply(sid, usage, status)


def settings_dict(sampling: SamplingParams) -> dict:
    return dict(max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
                top_k=sampling.top_k, repetition_penalty=sampling.repetition_penalty)


def visitor_message(exc: EngineError) -> str:
    """What a visitor of a public page may read: no internal URLs, hosts or stack traces
    (the log keeps the detail)."""
    if isinstance(exc, SessionBusy):
        return BUSY
    if isinstance(exc, ContextOverflow):
        return exc.message[0].upper() + exc.message[1:].replace("max_new_tokens", "Max new tokens") + "."
    if isinstance(exc, NoImages):
        return exc.message + "."
    if isinstance(exc, InvalidRequest):
        return "The model server refused the request: " + exc.message.removeprefix("api: request rejected: ")
    if isinstance(exc, BackendUnavailable):
        return "The model server is not reachable right now. Please try again in a minute."
    if isinstance(exc, AuthenticationFailed):
        return "The app could not sign in to its model server; its operator needs to check the API key."
    if isinstance(exc, ModelNotFound):
        return "The model server does not have the model this app is set up for; its operator needs to " \
               "check the settings."
    if exc.message.startswith("out of memory"):
        return "The model ran out of memory. Try a shorter conversation or fewer new tokens."
    return "The model failed to answer. Please try again."


def stats_error(exc: EngineError) -> str:
    """The stats line under a failed reply: what happened, in a few words, and what to do."""
    if isinstance(exc, ContextOverflow):
        fits = exc.max_new_tokens_that_fit
        return "Not sent: too long for the model's context. " + (
            f"Lower Max new tokens to {fits:,} or shorten the message." if fits else "Shorten the message.")
    if isinstance(exc, BackendUnavailable):
        return "No reply: the model server is not reachable. Try again in a minute."
    if isinstance(exc, SessionBusy):
        return "Not sent: a reply is still being written."
    return "No reply: " + visitor_message(exc)


def log_reply(sid: str, usage: Usage | None, status: str) -> None:
    """One line per reply: session, tokens, time to first token, finish reason, status."""
    if usage is None:
        logger.info("chat session={} status={}", sid, status)
        return
    ttft = "-" if usage.ttft_s is None else f"{usage.ttft_s * 1000:.0f}ms"
    logger.info("chat session={} prompt_tokens={} completion_tokens={} ttft={} finish={} status={}", sid,
                usage.prompt_tokens, usage.completion_tokens, ttft, usage.finish_reason, status)
