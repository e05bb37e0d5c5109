"""Chat history as the UI keeps it (Gradio messages) and as engines take it."""
from __future__ import annotations

from typing import Any

from infer_engine import Usage

ERROR_TITLE = "⚠️ Error"


def text_of(content: Any) -> str:
    """Gradio 6 may hand content back as [{'type': 'text', 'text': ...}, ...]."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", ""))
    if isinstance(content, (list, tuple)):
        return "".join(text_of(c) for c in content)
    return "" if content is None else str(content)


def is_error(message: dict) -> bool:
    return (message.get("metadata") or {}).get("title") == ERROR_TITLE


def error_message(text: str) -> dict:
    return {"role": "assistant", "content": text, "metadata": {"title": ERROR_TITLE, "status": "done"}}


def to_engine_messages(history: list[dict], system_prompt: str) -> list[dict]:
    """System prompt + turns; error notices are shown to the user but are not model turns."""
    msgs = [{"role": "system", "content": system_prompt}] if system_prompt.strip() else []
    for m in history:
        if m.get("role") in ("user", "assistant") and not is_error(m):
            msgs.append({"role": m["role"], "content": text_of(m.get("content"))})
    return msgs


def without_last_reply(history: list[dict]) -> list[dict]:
    """History up to and including the last user message."""
    h = list(history)
    while h and h[-1].get("role") != "user":
        h.pop()
    return h


def without_last_exchange(history: list[dict]) -> tuple[list[dict], str]:
    """Drop the last user message and its reply; return the question to put back in the box."""
    h = without_last_reply(history)
    if not h:
        return [], ""
    question = text_of(h.pop().get("content"))
    return h, question


def stats_line(usage: Usage | None) -> str:
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
        parts.append("cut at max new tokens")
    return " · ".join(parts)
