"""The Gradio chat UI over the Engine interface.

Per-visitor state lives in `gr.State` (each browser tab or API client has its own history) and
engine session ids come from the visitor's `session_hash`; this module holds no mutable state
shared between visitors. Stop cancels the generation in the engine, not only in the page.
"""
from __future__ import annotations

import queue
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

import gradio as gr
from loguru import logger
from starlette.middleware import Middleware

from infer_engine import Engine, EngineError, InvalidRequest, SamplingParams, Usage
from infer_engine.asgi import RequestLimits
from infer_engine.errors import (AuthenticationFailed, BackendUnavailable, ContextOverflow,
                                 ModelNotFound, SessionBusy)
from infer_engine.settings import check_text

from .history import (error_message, stats_line, to_engine_messages, without_last_exchange,
                      without_last_reply)
from .settings import AppSettings

UPDATE_INTERVAL_S = 0.05
MAX_BODY_BYTES = 1024 * 1024  # the app takes no uploads: no request needs more
BUSY = "A reply is still being written in this chat: wait for it to finish, or press Stop."
CSS = "#stats, #stats_a, #stats_b {font-size: 0.85em; opacity: 0.75; min-height: 1.5em}"


class ChatUI:
    def __init__(self, engine: Engine, settings: AppSettings, compare: Engine | None = None,
                 label: str | None = None, compare_label: str | None = None):
        self.engine, self.compare_engine, self.settings = engine, compare, settings
        self.label = label or settings.model_label or _name_of(engine)
        self.compare_label = compare_label or settings.compare_label or (
            _name_of(compare) if compare else "")
        self._active: dict[str, object] = {}  # chat (session id) -> its reply in progress
        self._active_lock = threading.Lock()

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

    @contextmanager
    def _turn(self, sid: str) -> Iterator[None]:
        """One reply at a time per chat: a second Send while one streams is refused, readably,
        before it changes anything (the first one's history would otherwise overwrite it)."""
        token = object()
        with self._active_lock:
            if sid in self._active:
                raise gr.Error(BUSY)
            self._active[sid] = token
        try:
            yield
        finally:
            with self._active_lock:
                if self._active.get(sid) is token:
                    del self._active[sid]

    def _end_turn(self, engine: Engine | None, sid: str) -> None:
        """Stop, Clear, Undo: cancel the generation and free the chat for the next message."""
        with self._active_lock:
            self._active.pop(sid, None)
        if engine is not None:
            engine.cancel(sid)

    @staticmethod
    def _sampling(max_new_tokens: float, temperature: float, top_p: float, top_k: float,
                  repetition_penalty: float) -> SamplingParams:
        try:
            return SamplingParams(max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                                  top_p=float(top_p), top_k=int(top_k),
                                  repetition_penalty=float(repetition_penalty)).validate()
        except (InvalidRequest, TypeError, ValueError) as exc:
            raise gr.Error(f"Invalid setting: {exc}") from None

    @staticmethod
    def _stream_reply(engine: Engine, history: list[dict], system: str, sampling: SamplingParams,
                      sid: str) -> Iterator[tuple[list[dict], str, bool]]:
        """Append a reply to `history` (ending in a user message) as it streams; yields
        (history, stats line, refused: the request was refused before any output)."""
        msgs = to_engine_messages(history, system)
        history = history + [{"role": "assistant", "content": ""}]
        text, usage, shown, status = "", None, 0.0, "ok"
        try:
            engine.wait_session_free(sid, timeout=10)  # a stopped reply may still be letting go
            for delta in engine.stream_chat(msgs, sampling, sid):
                text += delta.text
                usage = delta.usage or usage
                now = time.monotonic()
                # Coalesce updates: re-rendering the page per token costs more than decoding it.
                if usage is None and now - shown < UPDATE_INTERVAL_S:
                    continue
                shown = now
                history[-1] = {"role": "assistant", "content": text}
                yield history, stats_line(usage) if usage else "…", False
        except EngineError as exc:
            status = f"{type(exc).__name__}: {exc.message}"
            history[-1] = error_message(visitor_message(exc))
            yield history, "", isinstance(exc, InvalidRequest) and not text
        finally:
            engine.cancel(sid)  # this generator was closed early (Stop, page closed)
            _log_event(sid, usage, status)

    # -- chat tab -----------------------------------------------------------------------
    def send(self, message: str, history: list[dict], system: str, max_new_tokens: float,
             temperature: float, top_p: float, top_k: float, repetition_penalty: float,
             request: gr.Request) -> Iterator[tuple]:
        message = self._check_input(message)
        system = self._check_input(system, "system prompt")
        sampling = self._sampling(max_new_tokens, temperature, top_p, top_k, repetition_penalty)
        if not message:
            yield history, history, gr.skip(), gr.skip()
            return
        sid = self._sid(request, "chat")
        with self._turn(sid):
            before = list(history or [])
            history = before + [{"role": "user", "content": message}]
            yield history, history, "", "…"
            for h, stats, refused in self._stream_reply(self.engine, history, system, sampling, sid):
                if refused:
                    # Refused before any output (too long for the context, ...): the message
                    # goes back into the box, not into the conversation.
                    h = before + [h[-1]]
                    yield h, h, message, stats
                    return
                yield h, h, gr.skip(), stats

    def retry(self, history: list[dict], system: str, max_new_tokens: float, temperature: float,
              top_p: float, top_k: float, repetition_penalty: float, request: gr.Request
              ) -> Iterator[tuple]:
        system = self._check_input(system, "system prompt")
        sampling = self._sampling(max_new_tokens, temperature, top_p, top_k, repetition_penalty)
        sid = self._sid(request, "chat")
        with self._turn(sid):
            history = without_last_reply(history or [])
            if not history:
                yield [], [], ""
                return
            yield history, history, "…"
            for h, stats, _ in self._stream_reply(self.engine, history, system, sampling, sid):
                yield h, h, stats

    def undo(self, history: list[dict], request: gr.Request) -> tuple:
        self._end_turn(self.engine, self._sid(request, "chat"))
        history, question = without_last_exchange(history or [])
        return history, history, question, ""

    def clear(self, request: gr.Request) -> tuple:
        self._end_turn(self.engine, self._sid(request, "chat"))
        return [], [], "", ""

    def stop(self, request: gr.Request) -> None:
        self._end_turn(self.engine, self._sid(request, "chat"))

    # -- compare tab --------------------------------------------------------------------
    def compare(self, message: str, hist_a: list[dict], hist_b: list[dict], system: str,
                max_new_tokens: float, temperature: float, top_p: float, top_k: float,
                repetition_penalty: float, request: gr.Request) -> Iterator[tuple]:
        """Both models answer the same question at the same time, each with its own history."""
        message = self._check_input(message)
        system = self._check_input(system, "system prompt")
        sampling = self._sampling(max_new_tokens, temperature, top_p, top_k, repetition_penalty)
        if not message:
            yield hist_a, hist_b, hist_a, hist_b, gr.skip(), gr.skip(), gr.skip()
            return
        with self._turn(self._sid(request, "compare")):
            yield from self._compare(message, hist_a, hist_b, system, sampling, request)

    def _compare(self, message: str, hist_a: list[dict], hist_b: list[dict], system: str,
                 sampling: SamplingParams, request: gr.Request) -> Iterator[tuple]:
        hists = [list(h or []) + [{"role": "user", "content": message}] for h in (hist_a, hist_b)]
        stats = ["…", "…"]
        yield hists[0], hists[1], hists[0], hists[1], "", *stats
        engines = [(self.engine, self._sid(request, "compare-a")),
                   (self.compare_engine, self._sid(request, "compare-b"))]
        events: queue.Queue = queue.Queue()
        done = object()

        def pump(i: int) -> None:
            engine, sid = engines[i]
            try:
                for h, stats, _ in self._stream_reply(engine, hists[i], system, sampling, sid):
                    events.put((i, (h, stats)))
            finally:
                events.put((i, done))

        for i in range(2):
            threading.Thread(target=pump, args=(i,), daemon=True).start()
        try:
            finished = 0
            while finished < 2:
                i, update = events.get()
                if update is done:
                    finished += 1
                    continue
                hists[i], stats[i] = update
                yield hists[0], hists[1], hists[0], hists[1], gr.skip(), *stats
        finally:
            for engine, sid in engines:
                engine.cancel(sid)

    def stop_compare(self, request: gr.Request) -> None:
        self._end_turn(None, self._sid(request, "compare"))
        self.engine.cancel(self._sid(request, "compare-a"))
        if self.compare_engine is not None:
            self.compare_engine.cancel(self._sid(request, "compare-b"))

    def clear_compare(self, request: gr.Request) -> tuple:
        self.stop_compare(request)
        return [], [], [], [], "", "", ""

    def on_leave(self, request: gr.Request) -> None:
        """A visitor closed the page: stop whatever they left running."""
        self.stop(request)
        self.stop_compare(request)

    # -- layout -------------------------------------------------------------------------
    def build(self) -> gr.Blocks:
        s = self.settings
        gen = dict(concurrency_limit=s.concurrency, concurrency_id="generate")
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
                    history = gr.State([])
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
                    # Enter and Send are one event: pressing both sends the message once.
                    ev_send = gr.on([box.submit, send_btn.click], self.send, [box, history, *sampling],
                                    outs, api_name="send", trigger_mode="once", **gen)
                    ev_retry = retry_btn.click(self.retry, [history, *sampling], [chatbot, history, stats],
                                               api_name="retry", trigger_mode="once", **gen)
                    running = [ev_send, ev_retry]
                    undo_btn.click(self.undo, [history], outs, api_name="undo", cancels=running)
                    clear_btn.click(self.clear, None, outs, api_name="clear", cancels=running)
                    stop_btn.click(self.stop, None, None, api_name="stop", cancels=running)
                if self.compare_engine is not None:
                    with gr.Tab("Compare"):
                        hist_a, hist_b = gr.State([]), gr.State([])
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
                        ev_cmp = gr.on([cbox.submit, cmp_btn.click], self.compare, cin, couts,
                                       api_name="compare", trigger_mode="once", **gen)
                        cstop.click(self.stop_compare, None, None, api_name="stop_compare",
                                    cancels=[ev_cmp])
                        cclear.click(self.clear_compare, None, couts, api_name="clear_compare",
                                     cancels=[ev_cmp])
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


def launch(demo: gr.Blocks, settings: AppSettings, prevent_thread_lock: bool = False,
           host: str | None = None, port: int | None = None) -> Any:
    """Queue and launch with settings fit for a public deployment."""
    demo.queue(max_size=settings.queue_size, default_concurrency_limit=settings.concurrency)
    return demo.launch(
        server_name=host or settings.host, server_port=port or settings.port,
        auth=settings.auth_pairs(), max_threads=max(40, 2 * settings.concurrency + 8),
        max_file_size="1mb",
        # No component takes files: uploads are refused, and no request body may exceed 1 MB.
        app_kwargs={"middleware": [Middleware(RequestLimits, max_bytes=MAX_BODY_BYTES, refused=("/upload",),
                                              refused_reason="this app takes no uploads")]},
        allowed_paths=[], show_error=False, ssr_mode=False, run_history=False,
        prevent_thread_lock=prevent_thread_lock, css=CSS)
