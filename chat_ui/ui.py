"""The Gradio chat UI over the Engine interface.

Per-visitor state lives in `gr.State` (each browser tab or API client has its own history) and
engine session ids come from the visitor's `session_hash`; what ChatUI keeps is keyed by those
ids (whose reply is in progress), never shared between visitors. Stop cancels the generation in
the engine, not only in the page.

Streaming is built for many users in one process (see scripts/bench_app.py): handlers are async
generators fed by the engine's stream on a pooled thread (no worker-thread hop per update),
updates are coalesced to a budget shared by all streams, and a streamed update carries only what
changes (the chat; the history State and the stats line once, at the end).
"""
from __future__ import annotations

import asyncio
import importlib.util
import os
import sys
import threading
from typing import Any, AsyncIterator, Iterator

import gradio as gr
from loguru import logger
from starlette.middleware import Middleware

from infer_engine import Engine, EngineError, InvalidRequest, SamplingParams, Usage
from infer_engine.aio import ThreadedStream
from infer_engine.asgi import RequestLimits
from infer_engine.errors import (AuthenticationFailed, BackendUnavailable, ContextOverflow,
                                 ModelNotFound, SessionBusy)
from infer_engine.settings import check_text

from .history import (error_message, stats_line, to_engine_messages, without_last_exchange,
                      without_last_reply)
from .settings import AppSettings

UPDATE_INTERVAL_S = 0.05  # the shortest gap between two updates of a streaming reply
MAX_BODY_BYTES = 1024 * 1024  # the app takes no uploads: no request needs more
BUSY = "A reply is still being written in this chat: wait for it to finish, or press Stop."
CSS = "#stats, #stats_a, #stats_b {font-size: 0.85em; opacity: 0.75; min-height: 1.5em}"


class _Turns:
    """Which chats have a reply in progress: one at a time per chat. A claim is taken before
    the history changes and held until the reply ends, so a second Send while one streams is
    refused, readably, instead of one history overwriting the other."""

    def __init__(self) -> None:
        self._claims: dict[str, int] = {}
        self._lock = threading.Lock()
        self._next = 0

    def claim(self, sid: str) -> int:
        with self._lock:
            if sid in self._claims:
                raise gr.Error(BUSY)
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

    def __len__(self) -> int:
        return len(self._claims)


class ChatUI:
    def __init__(self, engine: Engine, settings: AppSettings, compare: Engine | None = None,
                 label: str | None = None, compare_label: str | None = None):
        self.engine, self.compare_engine, self.settings = engine, compare, settings
        self.label = label or settings.model_label or _name_of(engine)
        self.compare_label = compare_label or settings.compare_label or (
            _name_of(compare) if compare else "")
        self._turns = _Turns()
        self._live: dict[str, list[dict]] = {}  # chat -> its history as last shown, while streaming

    # -- helpers ------------------------------------------------------------------------
    @staticmethod
    def _sid(request: gr.Request | None, which: str) -> str:
        return f"{getattr(request, 'session_hash', None) or 'anonymous'}:{which}"

    def _check_input(self, text: str, what: str = "message") -> str:
        text = (text or "").strip()
        if len(text) > self.settings.max_input_chars:
            raise gr.Error(f"Your {what} has {len(text)} characters; the limit is "
                           f"{self.settings.max_input_chars}. Please shorten it.")
        try:
            check_text(text, what)
        except InvalidRequest:
            raise gr.Error(f"Your {what} holds characters that are not valid text (a lone UTF-16 "
                           "surrogate); please retype it.") from None
        return text

    @staticmethod
    def _sampling(max_new_tokens: float, temperature: float, top_p: float, top_k: float,
                  repetition_penalty: float) -> SamplingParams:
        try:
            return SamplingParams(max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                                  top_p=float(top_p), top_k=int(top_k),
                                  repetition_penalty=float(repetition_penalty)).validate()
        except (InvalidRequest, TypeError, ValueError) as exc:
            raise gr.Error(f"Invalid setting: {exc}") from None

    def _interval(self) -> float:
        """Seconds between two updates of a streaming reply. Every update costs the server a
        render of the chat (~1.5 ms of the app's CPU, measured with yappi), so the app spends
        at most `max_updates_per_s` in all: one user sees 20 updates a second, 64 users about 8
        each, 128 about 4."""
        return max(UPDATE_INTERVAL_S, len(self._turns) / self.settings.max_updates_per_s)

    def _end_turn(self, engine: Engine | None, sid: str) -> None:
        """Stop, Clear, Undo: cancel the generation and free the chat for the next message."""
        self._turns.release(sid)
        if engine is not None:
            engine.cancel(sid)

    async def _stream_reply(self, engine: Engine, history: list[dict], system: str,
                            sampling: SamplingParams, sid: str) -> AsyncIterator[tuple[list[dict], str, bool]]:
        """Append a reply to `history` (ending in a user message) as it streams; yields
        (history, stats line, refused: the request was refused before any output).

        The engine's stream runs on a thread of its own; this coroutine takes what has arrived
        and shows it at most once per `_interval()`, without a worker thread per update."""
        msgs = to_engine_messages(history, system)
        history = history + [{"role": "assistant", "content": ""}]
        text, usage, status = "", None, "ok"

        def open_stream() -> Iterator:
            engine.wait_session_free(sid, timeout=10)  # a stopped reply may still be letting go
            return engine.stream_chat(msgs, sampling, sid)

        loop = asyncio.get_running_loop()
        stream, shown = ThreadedStream(open_stream), None
        try:
            while items := await stream.take():
                for delta in items:
                    text += delta.text
                    usage = delta.usage or usage
                if usage is None and shown is not None:
                    wait = shown + self._interval() - loop.time()
                    if wait > 0:  # what arrives meanwhile goes out with the next update
                        await stream.wait_end(wait)  # the end of the reply is shown at once
                shown = loop.time()
                history[-1] = {"role": "assistant", "content": text}
                self._live[sid] = history
                yield history, stats_line(usage) if usage else "…", False
        except EngineError as exc:
            status = f"{type(exc).__name__}: {exc.message}"
            history[-1] = error_message(visitor_message(exc))
            yield history, "", isinstance(exc, InvalidRequest) and not text
        finally:
            engine.cancel(sid)  # closed early (Stop, page closed): the engine stops too
            self._live.pop(sid, None)
            _log_event(sid, usage, status)

    def _accept(self, message: str, history: list[dict], system: str, sampling: SamplingParams,
                sid: str, engines: list[Engine]) -> int:
        """Claim the chat, and refuse (gr.Error, nothing changed) what cannot be answered:
        a busy chat, or a message that does not fit the context of the model(s)."""
        claim = self._turns.claim(sid)
        try:
            msgs = to_engine_messages(history + [{"role": "user", "content": message}], system)
            for engine in engines:
                engine.check(msgs, sampling)
        except EngineError as exc:
            self._turns.release(sid, claim)
            raise gr.Error(visitor_message(exc)) from None
        return claim

    # -- chat tab -----------------------------------------------------------------------
    def accept(self, message: str, history: list[dict], system: str, max_new_tokens: float,
               temperature: float, top_p: float, top_k: float, repetition_penalty: float,
               request: gr.Request) -> tuple:
        """Send, in the page (runs at once, unqueued): claim the chat, show the message, empty
        the box. The reply streams in the event that follows (`reply`)."""
        message = self._check_input(message)
        system = self._check_input(system, "system prompt")
        sampling = self._sampling(max_new_tokens, temperature, top_p, top_k, repetition_penalty)
        if not message:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), None
        claim = self._accept(message, history or [], system, sampling, self._sid(request, "chat"), [self.engine])
        history = list(history or []) + [{"role": "user", "content": message}]
        return "", history, history, "…", claim

    async def reply(self, claim: int | None, history: list[dict], system: str, max_new_tokens: float,
                    temperature: float, top_p: float, top_k: float, repetition_penalty: float,
                    request: gr.Request) -> AsyncIterator[tuple]:
        sid = self._sid(request, "chat")
        if not self._turns.holds(sid, claim):  # nothing accepted, or stopped meanwhile
            return
        try:
            sampling = self._sampling(max_new_tokens, temperature, top_p, top_k, repetition_penalty)
            before = list(history)[:-1]
            async for h, stats, refused in self._stream_reply(self.engine, list(history), system, sampling, sid):
                if refused:
                    h = before + [h[-1]]
                # the history State is written once, at the end (a State write costs Gradio a
                # config rebuild); Stop takes the reply so far from the live copy
                yield h, (h if stats != "…" else gr.skip()), stats
        finally:
            self._turns.release(sid, claim)

    async def send(self, message: str, history: list[dict], system: str, max_new_tokens: float,
                   temperature: float, top_p: float, top_k: float, repetition_penalty: float,
                   request: gr.Request) -> AsyncIterator[tuple]:
        """Send, as one API call (/send): the message in, the reply streamed out."""
        message = self._check_input(message)
        system = self._check_input(system, "system prompt")
        sampling = self._sampling(max_new_tokens, temperature, top_p, top_k, repetition_penalty)
        before = list(history or [])
        if not message:
            yield before, before, "", ""
            return
        sid = self._sid(request, "chat")
        claim = self._turns.claim(sid)
        try:
            # no update until the reply starts: at a burst of users, one Gradio step per event less
            history = before + [{"role": "user", "content": message}]
            async for h, stats, refused in self._stream_reply(self.engine, history, system, sampling, sid):
                if refused:
                    # Refused before any output (too long for the context, ...): the message
                    # goes back into the box, not into the conversation.
                    h = before + [h[-1]]
                    yield h, h, message, stats
                    return
                yield h, (h if stats != "…" else gr.skip()), "", stats
        finally:
            self._turns.release(sid, claim)

    async def retry(self, history: list[dict], system: str, max_new_tokens: float, temperature: float,
                    top_p: float, top_k: float, repetition_penalty: float, request: gr.Request
                    ) -> AsyncIterator[tuple]:
        system = self._check_input(system, "system prompt")
        sampling = self._sampling(max_new_tokens, temperature, top_p, top_k, repetition_penalty)
        sid = self._sid(request, "chat")
        claim = self._turns.claim(sid)
        try:
            history = without_last_reply(history or [])
            if not history:
                yield [], [], ""
                return
            yield history, history, "…"
            async for h, stats, _ in self._stream_reply(self.engine, history, system, sampling, sid):
                yield h, (h if stats != "…" else gr.skip()), stats
        finally:
            self._turns.release(sid, claim)

    def undo(self, history: list[dict], request: gr.Request) -> tuple:
        self._end_turn(self.engine, self._sid(request, "chat"))
        history, question = without_last_exchange(history or [])
        return history, history, question, ""

    def clear(self, request: gr.Request) -> tuple:
        self._end_turn(self.engine, self._sid(request, "chat"))
        return [], [], "", ""

    def stop(self, history: list[dict], request: gr.Request) -> tuple:
        """Stop: the reply so far stays, in the page and in the history."""
        sid = self._sid(request, "chat")
        live = self._live.get(sid)
        self._end_turn(self.engine, sid)
        return (live, "stopped") if live is not None else (gr.skip(), gr.skip())

    # -- compare tab --------------------------------------------------------------------
    def _compare_engines(self, request: gr.Request) -> list[tuple[Engine, str]]:
        return [(self.engine, self._sid(request, "compare-a")),
                (self.compare_engine, self._sid(request, "compare-b"))]

    def accept_compare(self, message: str, hist_a: list[dict], hist_b: list[dict], system: str,
                       max_new_tokens: float, temperature: float, top_p: float, top_k: float,
                       repetition_penalty: float, request: gr.Request) -> tuple:
        message = self._check_input(message)
        system = self._check_input(system, "system prompt")
        sampling = self._sampling(max_new_tokens, temperature, top_p, top_k, repetition_penalty)
        if not message:
            return (gr.skip(),) * 7 + (None,)
        claim = self._accept(message, hist_a or [], system, sampling, self._sid(request, "compare"),
                             [e for e, _ in self._compare_engines(request)])
        hists = [list(h or []) + [{"role": "user", "content": message}] for h in (hist_a, hist_b)]
        return "", hists[0], hists[1], hists[0], hists[1], "…", "…", claim

    async def reply_compare(self, claim: int | None, hist_a: list[dict], hist_b: list[dict], system: str,
                            max_new_tokens: float, temperature: float, top_p: float, top_k: float,
                            repetition_penalty: float, request: gr.Request) -> AsyncIterator[tuple]:
        sid = self._sid(request, "compare")
        if not self._turns.holds(sid, claim):
            return
        try:
            sampling = self._sampling(max_new_tokens, temperature, top_p, top_k, repetition_penalty)
            async for a, b, sa, sb in self._both_answer([list(hist_a), list(hist_b)], system, sampling, request):
                yield a, b, a, b, sa, sb
        finally:
            self._turns.release(sid, claim)

    async def compare(self, message: str, hist_a: list[dict], hist_b: list[dict], system: str,
                      max_new_tokens: float, temperature: float, top_p: float, top_k: float,
                      repetition_penalty: float, request: gr.Request) -> AsyncIterator[tuple]:
        """Compare, as one API call (/compare): both models answer the same question at the
        same time, each with its own history."""
        message = self._check_input(message)
        system = self._check_input(system, "system prompt")
        sampling = self._sampling(max_new_tokens, temperature, top_p, top_k, repetition_penalty)
        if not message:
            yield hist_a, hist_b, hist_a, hist_b, "", "", ""
            return
        sid = self._sid(request, "compare")
        claim = self._turns.claim(sid)
        try:
            hists = [list(h or []) + [{"role": "user", "content": message}] for h in (hist_a, hist_b)]
            yield hists[0], hists[1], hists[0], hists[1], "", "…", "…"
            async for a, b, sa, sb in self._both_answer(hists, system, sampling, request):
                yield a, b, a, b, "", sa, sb
        finally:
            self._turns.release(sid, claim)

    async def _both_answer(self, hists: list[list[dict]], system: str, sampling: SamplingParams,
                           request: gr.Request) -> AsyncIterator[tuple]:
        """Both models' replies as they stream: (history a, history b, stats a, stats b)."""
        streams = [self._stream_reply(engine, hists[i], system, sampling, sid)
                   for i, (engine, sid) in enumerate(self._compare_engines(request))]
        shown, stats = list(hists), ["…", "…"]
        pending = {asyncio.ensure_future(anext(s)): i for i, s in enumerate(streams)}
        try:
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    i = pending.pop(task)
                    try:
                        shown[i], stats[i], _ = task.result()
                    except StopAsyncIteration:
                        continue
                    pending[asyncio.ensure_future(anext(streams[i]))] = i
                yield shown[0], shown[1], stats[0], stats[1]
        finally:
            for task in pending:
                task.cancel()
            for s in streams:
                await s.aclose()

    def stop_compare(self, request: gr.Request) -> None:
        self._end_turn(None, self._sid(request, "compare"))
        for engine, sid in self._compare_engines(request):
            if engine is not None:
                engine.cancel(sid)

    def clear_compare(self, request: gr.Request) -> tuple:
        self.stop_compare(request)
        return [], [], [], [], "", "", ""

    def on_leave(self, request: gr.Request) -> None:
        """A visitor closed the page: stop whatever they left running."""
        self._end_turn(self.engine, self._sid(request, "chat"))
        self.stop_compare(request)

    # -- layout -------------------------------------------------------------------------
    def build(self) -> gr.Blocks:
        s = self.settings
        gen = dict(concurrency_limit=s.concurrency or self.engine.max_concurrency, concurrency_id="generate")
        # Gradio recomputes its monitoring summary with pandas over up to 10,000 recorded events
        # after every event (GRADIO_ANALYTICS_CACHE_FREQUENCY=1): ~2 ms per event, growing with
        # traffic (yappi). The app has no monitoring page: keep a short record, summed rarely.
        os.environ.setdefault("GRADIO_ANALYTICS_MAX_EVENTS", "1000")
        os.environ.setdefault("GRADIO_ANALYTICS_CACHE_FREQUENCY", "1000")
        # No analytics calls from a public deployment; Gradio's cache (nothing lands there
        # while uploads are refused) is swept hourly of files older than an hour.
        with gr.Blocks(title=s.title, analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
            gr.Markdown(f"## {s.title}")
            with gr.Accordion("Generation settings", open=False):
                system = gr.Textbox(s.system_prompt, label="System prompt", lines=2,
                                    max_length=s.max_input_chars)
                with gr.Row():
                    max_new = gr.Slider(1, max(4096, s.max_new_tokens), value=s.max_new_tokens, step=1,
                                        label="Max new tokens")
                    temperature = gr.Slider(0, 2, value=s.temperature, step=0.05,
                                            label="Temperature (0 = greedy)")
                    top_p = gr.Slider(0.05, 1, value=SamplingParams.top_p, step=0.05, label="Top-p")
                    top_k = gr.Slider(0, 100, value=SamplingParams.top_k, step=1, label="Top-k (0 = off)")
                    rep = gr.Slider(1, 2, value=SamplingParams.repetition_penalty, step=0.01,
                                    label="Repetition penalty")
            sampling = [system, max_new, temperature, top_p, top_k, rep]
            with gr.Tabs():
                with gr.Tab("Chat"):
                    history, claim = gr.State([]), gr.State(None)
                    chatbot = gr.Chatbot(label=self.label, height=480, elem_id="chatbot")
                    stats = gr.Markdown("", elem_id="stats")
                    with gr.Row():
                        box = gr.Textbox(placeholder="Type a message and press Enter", show_label=False,
                                         scale=8, max_length=s.max_input_chars, elem_id="input")
                        send_btn = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                        stop_btn = gr.Button("Stop", variant="stop", scale=1, elem_id="stop")
                    with gr.Row():
                        retry_btn = gr.Button("Retry", size="sm")
                        undo_btn = gr.Button("Undo", size="sm")
                        clear_btn = gr.Button("Clear", size="sm")
                    if s.example_list():
                        gr.Examples(s.example_list(), inputs=box, label="Examples")
                    outs = [chatbot, history, box, stats]
                    # In the page, Send is two events (as gr.ChatInterface does it): one that
                    # takes the message at once, and one that streams the reply into the chat
                    # alone, so no streamed update touches the box (re-rendering an untouched
                    # component per update was the app's main cost at 64 users).
                    ev_accept = gr.on([box.submit, send_btn.click], self.accept, [box, history, *sampling],
                                      [box, chatbot, history, stats, claim], queue=False,
                                      api_visibility="undocumented", trigger_mode="once")
                    ev_reply = ev_accept.success(self.reply, [claim, history, *sampling], [chatbot, history, stats],
                                                 api_visibility="undocumented", **gen)
                    api_send = gr.Button(visible=False)  # /send: the same, as one API call
                    # pre/postprocess=False: API clients send and take plain values (checked here),
                    # and a streamed update costs Gradio no component round trip per output
                    ev_api = api_send.click(self.send, [box, history, *sampling], outs, api_name="send",
                                            preprocess=False, postprocess=False, **gen)
                    ev_retry = retry_btn.click(self.retry, [history, *sampling], [chatbot, history, stats],
                                               api_name="retry", trigger_mode="once", **gen)
                    running = [ev_reply, ev_api, ev_retry]
                    undo_btn.click(self.undo, [history], outs, api_name="undo", cancels=running)
                    clear_btn.click(self.clear, None, outs, api_name="clear", cancels=running)
                    stop_btn.click(self.stop, [history], [history, stats], api_name="stop", cancels=running)
                if self.compare_engine is not None:
                    with gr.Tab("Compare"):
                        hist_a, hist_b, cclaim = gr.State([]), gr.State([]), gr.State(None)
                        with gr.Row():
                            with gr.Column():
                                chat_a = gr.Chatbot(label=self.label, height=440, elem_id="chat_a")
                                stats_a = gr.Markdown("", elem_id="stats_a")
                            with gr.Column():
                                chat_b = gr.Chatbot(label=self.compare_label, height=440, elem_id="chat_b")
                                stats_b = gr.Markdown("", elem_id="stats_b")
                        with gr.Row():
                            cbox = gr.Textbox(placeholder="One question, both models answer",
                                              show_label=False, scale=8, max_length=s.max_input_chars)
                            cmp_btn = gr.Button("Ask both", variant="primary", scale=1)
                            cstop = gr.Button("Stop", variant="stop", scale=1)
                            cclear = gr.Button("Clear", scale=1)
                        if s.example_list():
                            gr.Examples(s.example_list(), inputs=cbox, label="Examples")
                        couts = [chat_a, chat_b, hist_a, hist_b, cbox, stats_a, stats_b]
                        cin = [cbox, hist_a, hist_b, *sampling]
                        ev_caccept = gr.on([cbox.submit, cmp_btn.click], self.accept_compare, cin,
                                           [cbox, chat_a, chat_b, hist_a, hist_b, stats_a, stats_b, cclaim],
                                           queue=False, api_visibility="undocumented", trigger_mode="once")
                        ev_creply = ev_caccept.success(
                            self.reply_compare, [cclaim, hist_a, hist_b, *sampling],
                            [chat_a, chat_b, hist_a, hist_b, stats_a, stats_b], api_visibility="undocumented", **gen)
                        api_compare = gr.Button(visible=False)
                        ev_capi = api_compare.click(self.compare, cin, couts, api_name="compare", **gen)
                        crunning = [ev_creply, ev_capi]
                        cstop.click(self.stop_compare, None, None, api_name="stop_compare", cancels=crunning)
                        cclear.click(self.clear_compare, None, couts, api_name="clear_compare", cancels=crunning)
            demo.unload(self.on_leave)
        return demo


def _name_of(engine: Engine) -> str:
    try:
        return engine.model_name
    except EngineError:  # a remote API that is down at start: the app still comes up
        return "model"


def visitor_message(exc: EngineError) -> str:
    """What a visitor of a public page may read: no internal URLs, hosts or stack traces
    (the log keeps the detail)."""
    if isinstance(exc, SessionBusy):
        return BUSY
    if isinstance(exc, ContextOverflow):
        return exc.message[0].upper() + exc.message[1:].replace("max_new_tokens", "Max new tokens") + "."
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


def _log_event(sid: str, usage: Usage | None, status: str) -> None:
    """One line per reply: session, tokens, time to first token, finish reason, status."""
    if usage is None:
        logger.info("chat session={} status={}", sid, status)
        return
    ttft = "-" if usage.ttft_s is None else f"{usage.ttft_s * 1000:.0f}ms"
    logger.info("chat session={} prompt_tokens={} completion_tokens={} ttft={} finish={} status={}", sid,
                usage.prompt_tokens, usage.completion_tokens, ttft, usage.finish_reason, status)


def _no_matplotlib_lookups() -> None:
    """Gradio wraps every event step in `import matplotlib` (twice: MatplotlibBackendMananger);
    without matplotlib installed each attempt walks sys.path again, ~1 ms per streamed update
    (measured with yappi: a quarter of the app's CPU at 64 streams). Marking the module absent
    makes the import fail at once, exactly as it would after the walk."""
    if importlib.util.find_spec("matplotlib") is None:
        sys.modules.setdefault("matplotlib", None)


def launch(demo: gr.Blocks, settings: AppSettings, prevent_thread_lock: bool = False,
           host: str | None = None, port: int | None = None) -> Any:
    """Queue and launch with settings fit for a public deployment."""
    _no_matplotlib_lookups()
    # generation events carry their own limit (concurrency_id "generate"); Stop, Undo, Clear
    # take no time and need none
    demo.queue(max_size=settings.queue_size, default_concurrency_limit=None)
    # Gradio runs at most max_threads events at once, whatever their concurrency limits
    # (queueing.py: active_jobs): leave room for every reply the engine can run, plus the rest.
    limits = [fn.concurrency_limit for fn in demo.fns.values() if isinstance(fn.concurrency_limit, int)]
    return demo.launch(
        server_name=host or settings.host, server_port=port or settings.port,
        auth=settings.auth_pairs(), max_threads=max([40] + [n + 16 for n in limits]),
        max_file_size="1mb",
        # No component takes files: uploads are refused, and no request body may exceed 1 MB.
        app_kwargs={"middleware": [Middleware(RequestLimits, max_bytes=MAX_BODY_BYTES, refused=("/upload",),
                                              refused_reason="this app takes no uploads")]},
        allowed_paths=[], show_error=False, ssr_mode=False, run_history=False,
        prevent_thread_lock=prevent_thread_lock, css=CSS)
