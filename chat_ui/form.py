"""The page's form: the system prompt and the five sampling sliders (the side panel's
"Generation settings"). Events take `form.inputs` and turn the values into one checked `Form`
with `Conversations.form(*values)`, once per action."""
from __future__ import annotations

from typing import Any

import gradio as gr

from .conversation import Conversations
from .store import Chat


class FormFields:
    def __init__(self, service: Conversations, system_prompt: str):
        defaults = service.default_settings()
        self.system = gr.Textbox(system_prompt, label="System prompt", lines=3, elem_id="system")
        self.max_new = gr.Slider(1, service.max_new_cap(), value=defaults["max_new_tokens"], step=1,
                                 label="Max new tokens", elem_id="max_new")
        self.temperature = gr.Slider(0, 2, value=defaults["temperature"], step=0.05,
                                     label="Temperature (0 = greedy)", elem_id="temperature")
        self.top_p = gr.Slider(0.05, 1, value=defaults["top_p"], step=0.05, label="Top-p")
        self.top_k = gr.Slider(0, 100, value=defaults["top_k"], step=1, label="Top-k (0 = off)")
        self.rep = gr.Slider(1, 2, value=defaults["repetition_penalty"], step=0.01, label="Repetition penalty")
        self.sliders = [self.max_new, self.temperature, self.top_p, self.top_k, self.rep]
        self.inputs = [self.system, *self.sliders]  # the order Conversations.form takes

    @staticmethod
    def values(service: Conversations, chat: Chat) -> tuple:
        """The form as a chat keeps it: its system prompt, then its sliders."""
        st = service.chat_settings(chat)
        return (chat.system, st["max_new_tokens"], st["temperature"], st["top_p"], st["top_k"],
                st["repetition_penalty"])


def slider_settings(max_new_tokens: Any, temperature: Any, top_p: Any, top_k: Any, repetition_penalty: Any) -> dict:
    """The sliders as a chat keeps them ({} if one is not a number: nothing saved)."""
    try:
        return dict(max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_p=float(top_p),
                    top_k=int(top_k), repetition_penalty=float(repetition_penalty))
    except (TypeError, ValueError):
        return {}
