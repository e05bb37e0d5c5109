"""The side panel: the visitor's chats (new, switch, rename, delete), the form, export and import.
Every change of chat stops the chat's reply first (Conversations does) and shows the chat as the
store has it."""
from __future__ import annotations

import html
from typing import Any

import gradio as gr

from .conversation import Conversations, Refusal
from .form import FormFields, slider_settings
from .history import display, feedback_of
from .page import refusal, refusing, system_hint
from .store import Chat, export_all_json, export_json, markdown
from .stream import STOP_READING
from .visitors import visitor_of

JSON, MARKDOWN, ALL = "This chat: training JSONL", "This chat: Markdown", "All my chats: training JSONL"


class Sidebar:
    def __init__(self, service: Conversations):
        self.service = service
        with gr.Sidebar(open=False, label="Chats"):
            self.new_btn = gr.Button("+ New chat", size="sm", elem_id="new_chat")
            self.chat_list = gr.Radio(choices=[], label="Your chats (kept in this browser)", elem_id="chat_list")
            with gr.Row():
                self.title_box = gr.Textbox(label="Rename this chat", placeholder="New title", scale=3,
                                            elem_id="rename_box")
                self.rename_btn = gr.Button("Rename", size="sm", scale=1, elem_id="rename")
            self.delete_btn = gr.Button("Delete this chat", size="sm", variant="secondary", elem_id="delete_chat")
            self.undelete_btn = gr.Button("↶ Undo delete", size="sm", visible=False, elem_id="undo_delete")
            with gr.Accordion("Generation settings", open=False, elem_id="settings"):
                self.form = FormFields(service, service.settings.system_prompt)
            with gr.Accordion("Export / import", open=False, elem_id="export"):
                self.fmt = gr.Radio([JSON, MARKDOWN, ALL], value=JSON, label="Export",
                                    info="training JSONL: what the training tools read as it is, 👍/👎 included; "
                                         "a 👎 reply is left out as a target")
                self.export_btn = gr.Button("Export", size="sm", elem_id="export_btn")
                self.export_file = gr.HTML("", elem_id="export_file")  # a link, served once (chat_ui/visitors.py)
                self.import_box = gr.Textbox(label="Import a chat: paste its JSON", lines=3, elem_id="import_box")
                self.import_btn = gr.Button("Import", size="sm", elem_id="import_btn")
                self.import_note = gr.Markdown("")

    # -- what the page shows of a chat --------------------------------------------------
    def chat_list_of(self, ptr: dict) -> Any:
        chats = self.service.store.chats(ptr["browser"])
        return gr.update(choices=[(c.title or "New chat", c.id) for c in chats], value=ptr["chat"])

    def view(self, ptr: dict, chat: Chat) -> tuple:
        """Everything the page shows of one chat: the chat list, the chat window, its form, the
        system-prompt hint (the components of `view_outputs`)."""
        return (self.chat_list_of(ptr), gr.update(value=display(chat.messages), feedback_value=feedback_of(chat.messages)),
                *FormFields.values(self.service, chat), system_hint(chat.system))

    def view_outputs(self, chatbot: Any, hint: Any) -> list:
        return [self.chat_list, chatbot, *self.form.inputs, hint]

    # -- events ---------------------------------------------------------------------------
    def _refused(self, extra: int = 0) -> Any:
        """A refusal (a full disk, ...) in place of a change of chat: nothing else changes."""
        return lambda exc: (*(gr.skip(),) * (1 + len(self.view_outputs(None, None))), refusal(exc),
                            *(gr.skip(),) * extra)

    async def new_chat(self, ptr: dict, system: str, *sliders: float) -> tuple:
        try:
            ptr, chat, notice = await self.service.new_chat(ptr, system, slider_settings(*sliders))
        except Refusal as exc:
            return self._refused()(exc)
        if notice:  # the browser's oldest chat went to make room: said, not silent
            gr.Info(notice)
        return (ptr, *self.view(ptr, chat), "")

    async def switch_chat(self, ptr: dict, chat_id: str) -> tuple:
        try:
            ptr, chat = await self.service.switch(ptr, chat_id)
        except Refusal as exc:
            return self._refused()(exc)
        return (ptr, *self.view(ptr, chat), "")

    @refusing(lambda exc: (refusal(exc) and gr.skip(), gr.skip()))
    def rename_chat(self, ptr: dict, title: str) -> tuple:
        return self.chat_list_of(self.service.rename(ptr, title)), ""

    async def delete_chat(self, ptr: dict) -> tuple:
        try:
            ptr, chat, deleted = await self.service.delete(ptr)
        except Refusal as exc:
            return self._refused(1)(exc)
        gr.Info(f"Deleted “{deleted.title}”. Undo delete (in the side panel) brings it back.")
        return (ptr, *self.view(ptr, chat), "", gr.update(visible=True, value=f"↶ Undo delete: “{deleted.title[:30]}”"))

    def undelete_chat(self, ptr: dict) -> tuple:
        try:
            restored = self.service.restore(ptr)
        except Refusal as exc:
            return self._refused(1)(exc)
        if restored is None:  # nothing to restore (another tab restored it): only the button goes
            return (gr.skip(),) * (2 + len(self.view_outputs(None, None))) + (gr.update(visible=False),)
        ptr, chat = restored
        return (ptr, *self.view(ptr, chat), "", gr.update(visible=False))

    @refusing(lambda exc: (gr.skip(), gr.skip()))
    def save_settings(self, ptr: dict, system: str, *sliders: float) -> tuple:
        ptr = self.service.save_settings(ptr, system, slider_settings(*sliders))
        return ptr, system_hint(system or "")

    def export_chat(self, ptr: dict, fmt: str, request: gr.Request) -> Any:
        """The export as a link the page's own browser can fetch once in the next 10 minutes
        (kept in memory: nothing left in Gradio's cache, nothing for another browser)."""
        ptr, chat = self.service.session(ptr)
        if fmt == ALL:
            body, name = export_all_json(self.service.store.chats(ptr["browser"])), "all chats.jsonl"
        else:
            body = markdown(chat) if fmt == MARKDOWN else export_json(chat)
            safe = "".join(ch for ch in chat.title if ch.isalnum() or ch in " -_")[:40].strip() or "chat"
            name = f"{safe}.{'md' if fmt == MARKDOWN else 'jsonl'}"
        visitor = visitor_of(request.headers, request.client.host if request.client else None)
        token = self.service.downloads.add(visitor, name, body.encode("utf-8"))
        return (f'<a href="chat/download/{token}" download="{html.escape(name)}">⬇ Download '
                f'{html.escape(name)}</a> <span>(once, within 10 minutes)</span>')

    @refusing(lambda exc: (*(gr.skip(),) * 10, refusal(exc), gr.skip()))
    async def import_chat(self, ptr: dict, text: str) -> tuple:
        ptr, chat, notice = await self.service.import_chat(ptr, text)
        return (ptr, *self.view(ptr, chat), notice, "")

    def wire(self, ptr: Any, chatbot: Any, hint: Any, stats: Any, reader: Any) -> None:
        view = self.view_outputs(chatbot, hint)
        # a change of chat stops the chat's reply: the page's reader stops reading at once
        gr.on([self.new_btn.click, self.chat_list.input, self.delete_btn.click, self.import_btn.click],
              None, None, [reader], js=STOP_READING)
        self.new_btn.click(self.new_chat, [ptr, *self.form.inputs], [ptr, *view, stats], api_visibility="private")
        self.chat_list.input(self.switch_chat, [ptr, self.chat_list], [ptr, *view, stats], api_visibility="private")
        gr.on([self.rename_btn.click, self.title_box.submit], self.rename_chat, [ptr, self.title_box],
              [self.chat_list, self.title_box], api_visibility="private", queue=False)
        self.delete_btn.click(self.delete_chat, [ptr], [ptr, *view, stats, self.undelete_btn], api_visibility="private")
        self.undelete_btn.click(self.undelete_chat, [ptr], [ptr, *view, stats, self.undelete_btn],
                                api_visibility="private")
        gr.on([self.new_btn.click, self.chat_list.input], lambda: gr.update(visible=False), None, [self.undelete_btn],
              queue=False, api_visibility="private")
        gr.on([self.form.system.blur, *[sl.release for sl in self.form.sliders]], self.save_settings,
              [ptr, *self.form.inputs], [ptr, hint], api_visibility="private", concurrency_limit=None)
        self.export_btn.click(self.export_chat, [ptr, self.fmt], [self.export_file], api_visibility="private")
        self.import_btn.click(self.import_chat, [ptr, self.import_box],
                              [ptr, *view, self.import_note, self.import_box], api_visibility="private")
