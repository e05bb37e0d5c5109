"""A conversation as the store keeps it, as the page shows it, and as engines take it.

Stored messages are `{"role": "user"|"assistant", "content": str}` (the training tools'
format), with `"images": [data URL, ...]` on a question that came with images,
`"error": True` on a notice that explains why a message got no answer (shown in the page, never
sent to a model) and `"feedback": "like"|"dislike"` on rated replies.
"""
from __future__ import annotations

from typing import Any

from infer_engine import Usage

from .images import shown_file

ERROR_MARK = "⚠️ "
CUT_NOTE = "\n\n*⚠️ Cut off: the app stopped while writing this reply (what came is kept).*"
TOO_LONG = "\x00too long: "  # what the page sends instead of a message over the limit (and its length)


def text_of(content: Any) -> str:
    """Gradio 6 may hand content back as [{'type': 'text', 'text': ...}, ...]."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", ""))
    if isinstance(content, (list, tuple)):
        return "".join(text_of(c) for c in content)
    return "" if content is None else str(content)


def error_message(text: str) -> dict:
    return {"role": "assistant", "content": text, "error": True}


def display(messages: list[dict], images: bool = True) -> list[dict]:
    """The chat window's value: one entry per stored message (so the chat window's indexes,
    in its edit / retry / like events, are the store's), notices shown in full, a question's
    images above its text (with images=False, as API clients get it: the text alone)."""
    out = []
    for m in messages:
        content = (ERROR_MARK + m["content"]) if m.get("error") else m["content"]
        if m.get("finish") == "cut":
            content += CUT_NOTE
        if images and m.get("images"):
            content = [{"path": shown_file(u), "mime_type": "image/jpeg"} for u in m["images"]] + \
                ([content] if content else [])
        out.append({"role": m["role"], "content": content})
    return out


def feedback_of(messages: list[dict]) -> list[str | None]:
    """What the chat window shows as rated, reply by reply (Gradio's feedback_value)."""
    return [{"like": "Like", "dislike": "Dislike"}.get(m.get("feedback")) for m in messages
            if m["role"] == "assistant"]


def to_engine_messages(messages: list[dict], system_prompt: str) -> list[dict]:
    """System prompt + turns; error notices are shown to the user but are not model turns, nor
    is a question that got only a notice (a model that refused it, a reply that failed at once)."""
    msgs = [{"role": "system", "content": system_prompt}] if system_prompt.strip() else []
    for i, m in enumerate(messages):
        unanswered = m.get("role") == "user" and i + 1 < len(messages) and messages[i + 1].get("error")
        if m.get("role") in ("user", "assistant") and not m.get("error") and not unanswered:
            text = text_of(m.get("content"))
            if m.get("images"):  # OpenAI content parts, as every backend takes them
                msgs.append({"role": m["role"], "content": [
                    *({"type": "image_url", "image_url": {"url": u}} for u in m["images"]),
                    {"type": "text", "text": text}]})
            else:
                msgs.append({"role": m["role"], "content": text})
    return msgs


def without_last_reply(messages: list[dict]) -> list[dict]:
    """Messages up to and including the last user message."""
    h = list(messages)
    while h and h[-1].get("role") != "user":
        h.pop()
    return h


def without_last_exchange(messages: list[dict]) -> tuple[list[dict], str]:
    """Drop the last user message and its reply; return the question."""
    h = without_last_reply(messages)
    if not h:
        return [], ""
    question = text_of(h.pop().get("content"))
    return h, question


def stats_line(usage: Usage | None, can_continue: bool = True) -> str:
    if usage is None:
        return ""
    parts = [f"{usage.completion_tokens} tokens"]
    if usage.ttft_s is not None:
        parts.append(f"first token {usage.ttft_s * 1000:.0f} ms")
    if usage.decode_tokens_per_s:
        parts.append(f"{usage.decode_tokens_per_s:.1f} tokens/s")
    if usage.finish_reason == "cancelled":
        parts.append("stopped")
    elif usage.finish_reason == "length":
        parts.append("cut at max new tokens" + (" (Continue goes on)" if can_continue else ""))
    return " · ".join(parts)
