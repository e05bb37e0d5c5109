"""The Gradio chat UI over the Engine interface.

Per-visitor state lives in `gr.State` (each browser tab or API client has its own history) and
engine session ids come from the visitor's `session_hash`; this module holds no mutable state
shared between visitors. Stop cancels the generation in the engine, not only in the page.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Any, Iterator

import gradio as gr

from infer_engine import Engine, EngineError, InvalidRequest, SamplingParams

from .history import (error_message, stats_line, to_engine_messages, without_last_exchange,
                      without_last_reply)
from .settings import AppSettings

UPDATE_INTERVAL_S = 0.05
CSS = "#stats, #stats_a, #stats_b {font-size: 0.85em; opacity: 0.75; min-height: 1.5em}"


class ChatUI:
    def __init__(self, engine: Engine, settings: AppSettings, compare: Engine | None = None,
                 label: str | None = None, compare_label: str | None = None):
        self.engine, self.compare_engine, self.settings = engine, compare, settings
        self.label = label or settings.model_label or _name_of(engine)
        self.compare_label = compare_label or settings.compare_label or (
            _name_of(compare) if compare else "")

    # -- helpers ------------------------------------------------------------------------
    @staticmethod
    def _sid(request: gr.Request | None, which: str) -> str:
        return f"{getattr(request, 'session_hash', None) or 'anonymous'}:{which}"

    def _check_input(self, message: str) -> str:
        message = (message or "").strip()
        if len(message) > self.settings.max_input_chars:
            raise gr.Error(f"Your message has {len(message)} characters; the limit is "
                           f"{self.settings.max_input_chars}. Please shorten it.")
        return message

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
                      sid: str) -> Iterator[tuple[list[dict], str]]:
        """Append a reply to `history` (ending in a user message) as it streams."""
        msgs = to_engine_messages(history, system)
        history = history + [{"role": "assistant", "content": ""}]
        text, usage, shown = "", None, 0.0
        try:
            for delta in engine.stream_chat(msgs, sampling, sid):
                text += delta.text
                usage = delta.usage or usage
                now = time.monotonic()
                # Coalesce updates: re-rendering the page per token costs more than decoding it.
                if usage is None and now - shown < UPDATE_INTERVAL_S:
                    continue
                shown = now
                history[-1] = {"role": "assistant", "content": text}
                yield history, stats_line(usage) if usage else "…"
        except EngineError as exc:
            history[-1] = error_message(str(exc))
            yield history, ""
        finally:
            engine.cancel(sid)  # this generator was closed early (Stop, page closed)

    # -- chat tab -----------------------------------------------------------------------
    def send(self, message: str, history: list[dict], system: str, max_new_tokens: float,
             temperature: float, top_p: float, top_k: float, repetition_penalty: float,
             request: gr.Request) -> Iterator[tuple]:
        message = self._check_input(message)
        sampling = self._sampling(max_new_tokens, temperature, top_p, top_k, repetition_penalty)
        if not message:
            yield history, history, gr.skip(), gr.skip()
            return
        history = list(history or []) + [{"role": "user", "content": message}]
        yield history, history, "", "…"
        for h, stats in self._stream_reply(self.engine, history, system, sampling,
                                           self._sid(request, "chat")):
            yield h, h, gr.skip(), stats

    def retry(self, history: list[dict], system: str, max_new_tokens: float, temperature: float,
              top_p: float, top_k: float, repetition_penalty: float, request: gr.Request
              ) -> Iterator[tuple]:
        sampling = self._sampling(max_new_tokens, temperature, top_p, top_k, repetition_penalty)
        history = without_last_reply(history or [])
        if not history:
            yield [], [], ""
            return
        yield history, history, "…"
        for h, stats in self._stream_reply(self.engine, history, system, sampling,
                                           self._sid(request, "chat")):
            yield h, h, stats

    def undo(self, history: list[dict], request: gr.Request) -> tuple:
        self.engine.cancel(self._sid(request, "chat"))
        history, question = without_last_exchange(history or [])
        return history, history, question, ""

    def clear(self, request: gr.Request) -> tuple:
        self.engine.cancel(self._sid(request, "chat"))
        return [], [], "", ""

    def stop(self, request: gr.Request) -> None:
        self.engine.cancel(self._sid(request, "chat"))
        if self.compare_engine is not None:
            self.engine.cancel(self._sid(request, "compare-a"))
            self.compare_engine.cancel(self._sid(request, "compare-b"))

    # -- compare tab --------------------------------------------------------------------
    def compare(self, message: str, hist_a: list[dict], hist_b: list[dict], system: str,
                max_new_tokens: float, temperature: float, top_p: float, top_k: float,
                repetition_penalty: float, request: gr.Request) -> Iterator[tuple]:
        """Both models answer the same question at the same time, each with its own history."""
        message = self._check_input(message)
        sampling = self._sampling(max_new_tokens, temperature, top_p, top_k, repetition_penalty)
        if not message:
            yield hist_a, hist_b, hist_a, hist_b, gr.skip(), gr.skip(), gr.skip()
            return
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
                for update in self._stream_reply(engine, hists[i], system, sampling, sid):
                    events.put((i, update))
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

    def clear_compare(self, request: gr.Request) -> tuple:
        self.stop(request)
        return [], [], [], [], "", "", ""

    def on_leave(self, request: gr.Request) -> None:
        """A visitor closed the page: stop whatever they left running."""
        self.stop(request)

    # -- layout -------------------------------------------------------------------------
    def build(self) -> gr.Blocks:
        s = self.settings
        gen = dict(concurrency_limit=s.concurrency, concurrency_id="generate")
        with gr.Blocks(title=s.title) as demo:
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
                    ev_send = box.submit(self.send, [box, history, *sampling], outs, api_name="send",
                                         trigger_mode="once", **gen)
                    ev_click = send_btn.click(self.send, [box, history, *sampling], outs,
                                              api_visibility="private", trigger_mode="once", **gen)
                    ev_retry = retry_btn.click(self.retry, [history, *sampling], [chatbot, history, stats],
                                               api_name="retry", trigger_mode="once", **gen)
                    running = [ev_send, ev_click, ev_retry]
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
                        ev_c1 = cbox.submit(self.compare, cin, couts, api_name="compare",
                                            trigger_mode="once", **gen)
                        ev_c2 = cmp_btn.click(self.compare, cin, couts, api_visibility="private",
                                              trigger_mode="once", **gen)
                        cstop.click(self.stop, None, None, api_visibility="private", cancels=[ev_c1, ev_c2])
                        cclear.click(self.clear_compare, None, couts, api_name="clear_compare",
                                     cancels=[ev_c1, ev_c2])
            demo.unload(self.on_leave)
        return demo


def _name_of(engine: Engine) -> str:
    try:
        return engine.model_name
    except EngineError:  # a remote API that is down at start: the app still comes up
        return "model"


def launch(demo: gr.Blocks, settings: AppSettings, prevent_thread_lock: bool = False,
           host: str | None = None, port: int | None = None) -> Any:
    """Queue and launch with settings fit for a public deployment."""
    demo.queue(max_size=settings.queue_size, default_concurrency_limit=settings.concurrency)
    return demo.launch(
        server_name=host or settings.host, server_port=port or settings.port,
        auth=settings.auth_pairs(), max_threads=max(40, 2 * settings.concurrency + 8),
        max_file_size="1mb",           # the app takes no uploads; refuse large bodies
        allowed_paths=[], show_error=True, ssr_mode=False, run_history=False,
        prevent_thread_lock=prevent_thread_lock, css=CSS)
