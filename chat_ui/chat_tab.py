"""The Chat tab: the chat window, the message box, Send/Stop and the reply controls.

Send is one Gradio event: the message is checked, saved and its reply started
(Conversations.send), and the page gets the reply's token; the reply's tokens then come through
the page's own stream reader (chat_ui/stream.py), outside Gradio's queue, and one more event
shows the chat as saved when it ends. Stop, Undo, Clear, Retry, Edit and Continue tell the reader
to stop at once (in the browser), then stop the reply on the server and show the chat as the store
has it.
"""
from __future__ import annotations

import json
from typing import Any

import gradio as gr
from loguru import logger

from .conversation import BUSY, Conversations, LiveReply, Refusal
from .history import display, error_message, feedback_of
from .page import (BUSY_BUTTONS, IDLE_BUTTONS, LATEX, WELCOME, counter_js, input_box, refusal, refusing,
                   text_of_event, too_long_js)
from .sidebar import Sidebar
from .stream import APPLY, READER, STOP_READING, start_value
from .visitors import visitor_of_request



class ChatTab:
    def __init__(self, service: Conversations, sidebar: Sidebar, label: str, examples: list[str]):
        self.service, self.sidebar = service, sidebar
        s = service.settings
        self.chatbot = gr.Chatbot(label=label, height=480, elem_id="chatbot", placeholder=WELCOME,
                                  examples=[{"text": e} for e in examples] or None, editable="user",
                                  feedback_options=("Like", "Dislike"), buttons=["copy", "copy_all"],
                                  latex_delimiters=LATEX, autoscroll=True)
        self.stats = gr.Markdown("", elem_id="stats")
        with gr.Row(elem_id="input_bar"):
            self.box = input_box(service.images, s.max_input_chars, s.max_image_mb, label="Message",
                                 autofocus=True, lines=1, max_lines=8, scale=8, elem_id="input",
                                 placeholder="Type a message and press Enter")
            self.send_btn = gr.Button("Send", variant="primary", scale=1, min_width=80, elem_id="send")
            self.stop_btn = gr.Button("Stop", variant="stop", scale=1, min_width=80, elem_id="stop", visible=False)
        self.counter = gr.HTML("", elem_id="counter")
        with gr.Row():
            small = dict(size="sm", min_width=60)  # one row on a phone too
            self.retry_btn = gr.Button("Retry", elem_id="retry", **small)
            self.continue_btn = gr.Button("Continue", elem_id="continue", **small)
            self.undo_btn = gr.Button("Undo", elem_id="undo", **small)
            self.clear_btn = gr.Button("Clear", elem_id="clear", **small)
        # the reply's reader: in the page, hidden (its value: start / stop / the latest update)
        self.reader = gr.HTML("", js_on_load=READER, visible="hidden", elem_id="reply_reader", padding=False)
        self.buttons = [self.send_btn, self.stop_btn]

    # -- sending -----------------------------------------------------------------------------
    def _started(self, ptr: dict, live: LiveReply | None) -> tuple:
        """(ptr, chat window, stats, reader, Send, Stop) once a reply has started."""
        if live is None:
            return (ptr, gr.skip(), gr.skip(), gr.skip(), *IDLE_BUTTONS)
        if live.notice:
            gr.Info(live.notice)
        return (ptr, display(live.messages() if live.prefix else live.base), "…", start_value(live.token),
                *BUSY_BUTTONS)

    async def accept(self, message: Any, ptr: dict, system: str, max_new_tokens: float, temperature: float,
                     top_p: float, top_k: float, repetition_penalty: float, request: gr.Request) -> tuple:
        """Send: the message checked, saved and its reply started; the box emptied, Stop shown.
        Refused: the message stays in the box and the page says why (in the chat too, not kept)."""
        form = (system, max_new_tokens, temperature, top_p, top_k, repetition_penalty)
        ptr, chat = self.service.session(ptr)
        try:
            live = await self.service.send(ptr, chat, message, self.service.form(*form), visitor_of_request(request))
        except Refusal as exc:
            shown = gr.skip() if exc.message == BUSY else \
                display(chat.messages + [error_message(f"Not sent: {exc.message}")])
            return (gr.skip(), ptr, shown, refusal(exc), gr.skip(), gr.skip(), gr.skip(), gr.skip())
        if live is None:  # nothing to send
            return (gr.skip(),) * 8
        ptr, shown, stats, reader, *buttons = self._started(ptr, live)
        return ("", ptr, shown, stats, reader, self.sidebar.chat_list_of(ptr), *buttons)

    async def accept_example(self, ptr: dict, system: str, max_new_tokens: float, temperature: float, top_p: float,
                             top_k: float, repetition_penalty: float, evt: gr.SelectData, request: gr.Request) -> tuple:
        """An example in the empty chat, clicked: sent at once."""
        form = (system, max_new_tokens, temperature, top_p, top_k, repetition_penalty)
        text = text_of_event(evt.value.get("text") if isinstance(evt.value, dict) else evt.value)
        return (await self.accept(text, ptr, *form, request))[1:]  # no box to empty

    @refusing(lambda exc: (gr.skip(), gr.skip(), refusal(exc), gr.skip(), gr.skip(), gr.skip()))
    async def retry(self, ptr: dict, *form: Any) -> tuple:
        """Retry (also the chat window's ↻): a new reply to the last question."""
        ptr, live = await self.service.retry(ptr, self.service.form(*form))
        return self._started(ptr, live)

    @refusing(lambda exc: (gr.skip(), gr.skip(), refusal(exc), gr.skip(), gr.skip(), gr.skip()))
    async def edit(self, ptr: dict, system: str, max_new_tokens: float, temperature: float, top_p: float,
                   top_k: float, repetition_penalty: float, evt: gr.EditData) -> tuple:
        """The chat window's ✎ on a question: changed, what came after dropped, answered anew."""
        form = (system, max_new_tokens, temperature, top_p, top_k, repetition_penalty)
        index = evt.index if isinstance(evt.index, int) else evt.index[0]
        ptr, live = await self.service.edit(ptr, index, text_of_event(evt.value), self.service.form(*form))
        if live is None:  # not a question (or emptied): the chat as it is
            ptr, chat = self.service.session(ptr)
            return (ptr, display(chat.messages), gr.skip(), gr.skip(), *IDLE_BUTTONS)
        return self._started(ptr, live)

    @refusing(lambda exc: (gr.skip(), gr.skip(), refusal(exc), gr.skip(), gr.skip(), gr.skip()))
    async def continue_reply(self, ptr: dict, *form: Any) -> tuple:
        """Continue: the model goes on with its last reply (after Stop or a cut at max tokens)."""
        ptr, live = await self.service.continue_reply(ptr, self.service.form(*form))
        return self._started(ptr, live)

    def finished(self, reader: str, ptr: dict) -> tuple:
        """The reader reached the reply's end: the chat as saved, Send back, the chat's title."""
        try:
            token = json.loads(reader or "{}").get("token")
        except (ValueError, AttributeError):
            token = None
        live = self.service.reply(token) if token else None
        ptr, chat = self.service.session(ptr)
        if (live is not None and live.interrupted) or self.service.running(ptr) is not None:
            return (gr.skip(),) * 5  # an action took the chat over (it shows it) or a new reply runs
        if live is None:
            logger.info("chat: the page's reply ended unseen (token {})", "given" if token else "missing")
        chat_view = gr.update(value=display(chat.messages), feedback_value=feedback_of(chat.messages))
        return (chat_view, live.stats if live is not None else gr.skip(), *IDLE_BUTTONS,
                self.sidebar.chat_list_of(ptr))

    # -- the reply's controls ----------------------------------------------------------------
    @refusing(lambda exc: (gr.skip(), refusal(exc), gr.skip(), gr.skip()))
    async def stop(self, ptr: dict) -> tuple:
        """Stop: the reply so far stays, in the page and in the chat."""
        chat, was = await self.service.stop(ptr)
        return (display(chat.messages) if chat else gr.skip(), "Stopped." if was else gr.skip(), *IDLE_BUTTONS)

    @refusing(lambda exc: (gr.skip(), gr.skip(), refusal(exc), gr.skip(), gr.skip()))
    async def undo(self, ptr: dict, box: Any, evt: gr.UndoData | None = None) -> tuple:
        """Undo (also the chat window's ↶): the last question and its reply dropped; the question
        goes back into the box, if the box is empty."""
        index = evt.index if evt is not None and isinstance(evt.index, int) else None
        chat, asked = await self.service.undo(ptr, index)
        box_value = asked if asked and not text_of_event(box).strip() else gr.skip()
        return (display(chat.messages), box_value, "", *IDLE_BUTTONS)

    @refusing(lambda exc: (gr.skip(), refusal(exc), gr.skip(), gr.skip()))
    async def clear(self, ptr: dict) -> tuple:
        """Clear (also the chat window's 🗑): this chat starts over, in the store too."""
        await self.service.clear(ptr)
        return ([], "", *IDLE_BUTTONS)

    @refusing(lambda exc: refusal(exc) and None)
    def like(self, ptr: dict, evt: gr.LikeData) -> None:
        """👍 / 👎 on a reply, kept with the chat (python -m chat_ui.export_feedback)."""
        index = evt.index if isinstance(evt.index, int) else evt.index[0]
        value = "like" if evt.liked in (True, "Like") else "dislike" if evt.liked in (False, "Dislike") else None
        self.service.like(ptr, index, value)

    def wire(self, ptr: Any) -> None:
        form = self.sidebar.form.inputs
        chatbot, stats, reader, buttons = self.chatbot, self.stats, self.reader, self.buttons
        started = [ptr, chatbot, stats, reader, *buttons]
        self.box.change(None, [self.box], [self.counter], js=counter_js(self.service.settings.max_input_chars),
                        queue=False)
        # queued (no limit: at once) for its warnings to reach the page as toasts
        gr.on([self.box.submit, self.send_btn.click], self.accept, [self.box, ptr, *form],
              [self.box, ptr, chatbot, stats, reader, self.sidebar.chat_list, *buttons], api_name="page_send",
              concurrency_limit=None, api_visibility="private", trigger_mode="once",
              js=too_long_js(self.service.settings.max_input_chars))
        chatbot.example_select(self.accept_example, [ptr, *form],
                               [ptr, chatbot, stats, reader, self.sidebar.chat_list, *buttons],
                               concurrency_limit=None, api_visibility="private")
        # the reply's updates, into the chat window, in the browser only; its end, from the store
        reader.change(None, [reader, chatbot, stats], [chatbot, stats, *buttons], js=APPLY, queue=False)
        reader.submit(self.finished, [reader, ptr], [chatbot, stats, *buttons, self.sidebar.chat_list],
                      api_name="page_reply_done", api_visibility="private", concurrency_limit=None)
        # an action that takes the chat over: the reader stops at once, then the server acts
        takeovers = [self.stop_btn.click, self.undo_btn.click, chatbot.undo, self.clear_btn.click, chatbot.clear,
                     self.retry_btn.click, chatbot.retry, chatbot.edit, self.continue_btn.click]
        gr.on(takeovers, None, None, [reader], js=STOP_READING, queue=False)
        gr.on([self.retry_btn.click, chatbot.retry], self.retry, [ptr, *form], started,
              api_name="page_retry", api_visibility="private", concurrency_limit=None)
        chatbot.edit(self.edit, [ptr, *form], started, api_visibility="private", concurrency_limit=None)
        self.continue_btn.click(self.continue_reply, [ptr, *form], started, api_visibility="private",
                                concurrency_limit=None)
        self.stop_btn.click(self.stop, [ptr], [chatbot, stats, *buttons], api_name="page_stop",
                            api_visibility="private", concurrency_limit=None)
        gr.on([self.undo_btn.click, chatbot.undo], self.undo, [ptr, self.box], [chatbot, self.box, stats, *buttons],
              api_name="page_undo", api_visibility="private", concurrency_limit=None)
        gr.on([self.clear_btn.click, chatbot.clear], self.clear, [ptr], [chatbot, stats, *buttons],
              api_name="page_clear", api_visibility="private", concurrency_limit=None)
        chatbot.like(self.like, [ptr], None, api_visibility="private", queue=False)

