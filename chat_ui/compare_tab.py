"""The Compare tab: one question, two models (the fine-tuned one and, say, its base) answering
side by side, each with its own history kept in the page; /compare as one API call. Its
replies stream through Gradio's queue (an operator's tool, not the public chat's load)."""
from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

import gradio as gr

from infer_engine import Engine, EngineError

from .conversation import Conversations, NoImages, Refusal, question
from .history import display, error_message, to_engine_messages
from .page import LATEX, as_error, input_box, refusal, refusing, too_long_js
from .replies import compare_reply, visitor_message
from .visitors import visitor_of_request


class CompareTab:
    def __init__(self, service: Conversations, engine: Engine, label: str, compare_label: str):
        self.service, self.engine, self.label, self.compare_label = service, engine, label, compare_label
        # visitor -> (claim, both sides' prepared requests) from Ask until the reply takes them
        # (or Stop, Clear, the page closed drop them)
        self._prepared: dict[str, tuple[int, list]] = {}
        s = service.settings
        with gr.Tab("Compare"):
            self.hist_a, self.hist_b, self.claim = gr.State([]), gr.State([]), gr.State(None)
            with gr.Row():
                with gr.Column():
                    self.chat_a = gr.Chatbot(label=label, height=440, elem_id="chat_a", latex_delimiters=LATEX,
                                             buttons=["copy_all"], feedback_options=None)
                    self.stats_a = gr.Markdown("", elem_id="stats_a")
                with gr.Column():
                    self.chat_b = gr.Chatbot(label=compare_label, height=440, elem_id="chat_b",
                                             latex_delimiters=LATEX, buttons=["copy_all"], feedback_options=None)
                    self.stats_b = gr.Markdown("", elem_id="stats_b")
            with gr.Row():
                self.box = input_box(service.images, s.max_input_chars, s.max_image_mb,
                                     label="Question for both models", scale=8, elem_id="cmp_input",
                                     placeholder="One question, both models answer")
                self.ask_btn = gr.Button("Ask both", variant="primary", scale=1, elem_id="cmp_send")
                self.stop_btn = gr.Button("Stop", variant="stop", scale=1, elem_id="cmp_stop")
                self.clear_btn = gr.Button("Clear", scale=1)
            if s.example_list():
                gr.Examples(s.example_list(), inputs=self.box, label="Examples")
            self.api_btn = gr.Button(visible=False)  # carries /compare

    def _engines(self, request: gr.Request) -> list[tuple[Engine, str]]:
        return [(self.service.engine, _sid(request, "compare-a")), (self.engine, _sid(request, "compare-b"))]

    def _turn(self, ask: dict, hists: list[list[dict] | None], form: Any, request: gr.Request) -> tuple[list, list]:
        """Both histories with the question and each side's prepared request. A side whose model
        cannot take it (a text-only model shown an image, too long for its context) gets a notice
        saying why in place of a reply; the other side answers. Refusal if neither can."""
        out, gens, refused = [], [], []
        for (engine, _), label, h in zip(self._engines(request), (self.label, self.compare_label), hists):
            h = list(h or []) + [ask]
            try:
                if ask.get("images") and not engine.accepts_images:
                    raise NoImages(f"{label} takes no images, only text")
                gens.append(engine.prepare(to_engine_messages(h, form.system), form.sampling))
            except EngineError as exc:
                refused.append(exc)
                gens.append(None)
                h.append(error_message(visitor_message(exc)))
            out.append(h)
        if len(refused) == len(out):
            raise Refusal(visitor_message(refused[0]), title="Not sent")
        return out, gens

    async def _both(self, hists: list[list[dict]], gens: list, request: gr.Request) -> AsyncIterator[tuple]:
        """Both replies as they stream: (messages a, messages b, stats a, stats b)."""
        streams = {i: compare_reply(engine, hists[i], gens[i], sid, self.service.interval)
                   for i, (engine, sid) in enumerate(self._engines(request)) if gens[i] is not None}
        shown, stats = list(hists), ["…" if g is not None else "" for g in gens]
        pending = {asyncio.ensure_future(anext(s)): i for i, s in streams.items()}
        try:
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    i = pending.pop(task)
                    try:
                        shown[i], stats[i] = task.result()
                    except StopAsyncIteration:
                        continue
                    pending[asyncio.ensure_future(anext(streams[i]))] = i
                yield shown[0], shown[1], stats[0], stats[1]
        finally:
            for task in pending:
                task.cancel()
            # a cancelled task is still inside its stream until it has taken the cancellation:
            # closing the stream before that fails ("aclose(): asynchronous generator is already
            # running") and leaves the other stream open
            await asyncio.gather(*pending, return_exceptions=True)
            for s in streams.values():
                await s.aclose()

    @refusing(lambda exc: (gr.skip(),) * 5 + (refusal(exc), gr.skip(), None))
    async def accept(self, message: Any, hist_a: list[dict], hist_b: list[dict], system: str, max_new_tokens: float,
                     temperature: float, top_p: float, top_k: float, repetition_penalty: float,
                     request: gr.Request) -> tuple:
        form = (system, max_new_tokens, temperature, top_p, top_k, repetition_penalty)
        text, images = await self.service.message_async(message, visitor_of_request(request))
        form = self.service.form(*form)
        if not text and not images:
            return (gr.skip(),) * 8
        sid = _sid(request, "compare")
        claim = self.service.turns.claim(sid)
        try:
            hists, gens = self._turn(question(text, images), [hist_a, hist_b], form, request)
        except BaseException:
            self.service.turns.release(sid, claim)
            raise
        self._prepared[sid] = (claim, gens)
        return ("", display(hists[0]), display(hists[1]), hists[0], hists[1],
                *("…" if g is not None else "" for g in gens), {"claim": claim})

    async def reply(self, pending: dict | None, hist_a: list[dict], hist_b: list[dict],
                    request: gr.Request) -> AsyncIterator[tuple]:
        sid, claim = _sid(request, "compare"), (pending or {}).get("claim")
        turns = self.service.turns
        prepared_claim, gens = self._prepared.pop(sid, (None, None))
        if not turns.holds(sid, claim) or prepared_claim != claim:
            return
        settled = turns.streaming(sid)
        try:
            async for a, b, sa, sb in self._both([list(hist_a), list(hist_b)], gens, request):
                if not turns.holds(sid, claim):
                    break  # Stop / Clear took over: nothing more of this reply goes out
                yield display(a), display(b), a, b, sa, sb
            if not turns.holds(sid, claim):
                # Gradio ends an event by sending its last value again: after Clear that would
                # be the reply as it was, overwriting what Clear showed
                yield (gr.skip(),) * 6
        finally:
            turns.release(sid, claim)
            turns.done(sid, settled)

    @as_error
    async def compare(self, message: Any, hist_a: list[dict], hist_b: list[dict], system: str,
                      max_new_tokens: float, temperature: float, top_p: float, top_k: float,
                      repetition_penalty: float, request: gr.Request) -> AsyncIterator[tuple]:
        """/compare, as one API call: both models answer the same question at the same time,
        each with its own history."""
        text, images = await self.service.message_async(message, visitor_of_request(request))
        form = self.service.form(system, max_new_tokens, temperature, top_p, top_k, repetition_penalty)
        if not text and not images:
            yield display(hist_a or [], images=False), display(hist_b or [], images=False), hist_a, hist_b, "", "", ""
            return
        sid = _sid(request, "compare")
        claim = self.service.turns.claim(sid)
        try:
            hists, gens = self._turn(question(text, images), [hist_a, hist_b], form, request)
            async for a, b, sa, sb in self._both(hists, gens, request):
                yield display(a, images=False), display(b, images=False), a, b, "", sa, sb
        finally:
            self.service.turns.release(sid, claim)

    async def stop(self, request: gr.Request) -> None:
        sid = _sid(request, "compare")
        self.service.turns.release(sid)
        self._prepared.pop(sid, None)
        for engine, engine_sid in self._engines(request):
            engine.cancel(engine_sid)
        await self.service.turns.settled(sid)

    async def stop_shown(self, stats_a: str, stats_b: str, request: gr.Request) -> tuple:
        """Stop, for the page: a side still waiting says it was stopped."""
        await self.stop(request)
        return tuple("Stopped." if st == "…" else st for st in (stats_a, stats_b))

    async def clear(self, request: gr.Request) -> tuple:
        await self.stop(request)
        return [], [], [], [], "", "", ""

    async def clear_a(self, stats_a: str, stats_b: str, request: gr.Request) -> tuple:
        """A side's own 🗑: the replies stop, and that side's history goes with its display (the
        next question is asked of that model afresh); the other side stays as it is."""
        return [], "", (await self.stop_shown(stats_a, stats_b, request))[1]

    async def clear_b(self, stats_a: str, stats_b: str, request: gr.Request) -> tuple:
        return [], (await self.stop_shown(stats_a, stats_b, request))[0], ""

    def wire(self, form: list, concurrency: int) -> None:
        gen = dict(concurrency_limit=concurrency, concurrency_id="generate")
        couts = [self.chat_a, self.chat_b, self.hist_a, self.hist_b, self.box, self.stats_a, self.stats_b]
        cin = [self.box, self.hist_a, self.hist_b, *form]
        accepted = gr.on([self.box.submit, self.ask_btn.click], self.accept, cin,
                         [self.box, self.chat_a, self.chat_b, self.hist_a, self.hist_b, self.stats_a, self.stats_b,
                          self.claim], concurrency_limit=None, api_visibility="private", trigger_mode="once",
                         js=too_long_js(self.service.settings.max_input_chars))
        replying = accepted.success(self.reply, [self.claim, self.hist_a, self.hist_b],
                                    [self.chat_a, self.chat_b, self.hist_a, self.hist_b, self.stats_a, self.stats_b],
                                    api_visibility="private", **gen)
        api = self.api_btn.click(self.compare, cin, couts, api_name="compare", preprocess=False,
                                             postprocess=False, **gen)
        self.stop_btn.click(self.stop, None, None, api_name="stop_compare", cancels=[replying, api])
        self.stop_btn.click(self.stop_shown, [self.stats_a, self.stats_b], [self.stats_a, self.stats_b],
                            api_visibility="private")
        self.clear_btn.click(self.clear, None, couts, api_name="clear_compare", cancels=[replying, api])
        stats = [self.stats_a, self.stats_b]
        self.chat_a.clear(self.clear_a, stats, [self.hist_a, *stats], cancels=[replying], api_visibility="private")
        self.chat_b.clear(self.clear_b, stats, [self.hist_b, *stats], cancels=[replying], api_visibility="private")


def _sid(request: gr.Request | None, which: str) -> str:
    return f"{getattr(request, 'session_hash', None) or 'anonymous'}:{which}"
