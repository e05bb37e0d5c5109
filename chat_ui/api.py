"""The chat's public API, one call per action (gradio_client, /gradio_api/call/<name>): /send,
/retry, /undo, /clear, /stop. The positional order of their inputs and outputs is public.
A reply streams through Gradio's queue here (an API client reads Gradio's protocol); the page
reads the same replies through its own route (chat_ui/stream.py)."""
from __future__ import annotations

from typing import Any, AsyncIterator

import gradio as gr

from .conversation import Conversations, LiveReply, Refused
from .history import display, error_message
from .page import as_error
from .visitors import visitor_of_request


class ChatApi:
    def __init__(self, service: Conversations):
        self.service = service

    def _chat(self, ptr: dict) -> list[dict]:
        chat = self.service.store.get(ptr["browser"], ptr["chat"])
        return display(chat.messages if chat else [], images=False)

    async def _stream(self, live: LiveReply) -> AsyncIterator[tuple[list[dict], str]]:
        async for r in self.service.read(live):
            yield display(r.messages(), images=False), r.stats

    @as_error
    async def send(self, message: Any, ptr: dict, system: str, max_new_tokens: float, temperature: float,
                   top_p: float, top_k: float, repetition_penalty: float,
                   request: gr.Request = None) -> AsyncIterator[tuple]:
        """/send: the message in (text, or {"text", "files"} for an image model), the reply
        streamed out: (chat, box, stats); the chat as text (images are kept, not sent back)."""
        form = self.service.form(system, max_new_tokens, temperature, top_p, top_k, repetition_penalty)
        ptr, chat = self.service.session(ptr)
        try:
            live = await self.service.send(ptr, chat, message, form, visitor_of_request(request))
        except Refused as exc:  # refused before anything changed: shown in the chat, message kept
            kept = (message.get("text") if isinstance(message, dict) else message) or ""
            yield display(chat.messages + [error_message(exc.message)], images=False), kept.strip(), "", ptr
            return
        if live is None:
            yield display(chat.messages, images=False), "", "", ptr
            return
        first = True
        async for shown, stats in self._stream(live):
            yield shown, "", stats, (ptr if first else gr.skip())
            first = False

    @as_error
    async def retry(self, ptr: dict, system: str, max_new_tokens: float, temperature: float, top_p: float,
                    top_k: float, repetition_penalty: float) -> AsyncIterator[tuple]:
        """/retry: a new reply to the last question: (chat, stats)."""
        form = self.service.form(system, max_new_tokens, temperature, top_p, top_k, repetition_penalty)
        ptr, live = await self.service.retry(ptr, form)
        if live is None:
            yield self._chat(ptr), "", ptr
            return
        async for shown, stats in self._stream(live):
            yield shown, stats, ptr

    async def undo(self, ptr: dict) -> tuple:
        """/undo: (chat, the question taken back, stats)."""
        chat, asked = await self.service.undo(ptr)
        return display(chat.messages, images=False), asked, ""

    async def clear(self, ptr: dict) -> tuple:
        await self.service.clear(ptr)
        return [], "", ""

    async def stop(self, ptr: dict) -> tuple:
        chat, was = await self.service.stop(ptr)
        return display(chat.messages if chat else [], images=False), "Stopped." if was else ""

    def wire(self, box: Any, ptr: Any, form: list, chatbot: Any, stats: Any) -> None:
        """Hidden buttons carry the API's events (the page's own events are private)."""
        raw = dict(preprocess=False, postprocess=False)
        gr.Button(visible=False).click(self.send, [box, ptr, *form], [chatbot, box, stats, ptr], api_name="send",
                                       concurrency_limit=None, **raw)
        gr.Button(visible=False).click(self.retry, [ptr, *form], [chatbot, stats, ptr], api_name="retry",
                                       concurrency_limit=None, **raw)
        gr.Button(visible=False).click(self.undo, [ptr], [chatbot, box, stats], api_name="undo", postprocess=False)
        gr.Button(visible=False).click(self.clear, [ptr], [chatbot, box, stats], api_name="clear", postprocess=False)
        gr.Button(visible=False).click(self.stop, [ptr], [chatbot, stats], api_name="stop", postprocess=False)
