"""What the page's parts share: its style and script, the message box, the Send/Stop pair, and
how a refusal is shown."""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Iterator

import gradio as gr

from .images import MAX_IMAGES_PER_MESSAGE
from .replies import Refusal

WELCOME = ("### Welcome\nAsk anything below, or start with an example. Your chats are kept for this browser "
           "in the side panel (the arrow at the top left): switch, rename, export or delete them there.")
LATEX = [{"left": "$$", "right": "$$", "display": True}, {"left": "$", "right": "$", "display": False},
         {"left": "\\(", "right": "\\)", "display": False}, {"left": "\\[", "right": "\\]", "display": True}]

# Text and buttons at >= 4.5:1 contrast (Gradio's orange Send was 2.8:1, its red Stop 3.8:1, the
# placeholder 1.9:1); the input bar stays in view on a phone while a reply streams.
CSS = """
#stats, #stats_a, #stats_b, #counter {font-size: 0.85em; color: #374151; min-height: 1.5em}
#counter.over, #counter .over {color: #b91c1c; font-weight: 600}
#send, #cmp_send {background: #c2410c !important; color: #ffffff !important; border-color: #c2410c !important}
#stop, #cmp_stop {background: #b91c1c !important; color: #ffffff !important; border-color: #b91c1c !important}
#input textarea::placeholder, #cmp_input textarea::placeholder {color: #4b5563 !important; opacity: 1}
#banner {background: #fef3c7; color: #78350f; border-radius: 6px; padding: 0 0.75em}
#system_hint {font-size: 0.85em; color: #374151}
#input_bar {position: sticky; bottom: 0; z-index: 20; background: var(--background-fill-primary)}
@media (max-width: 640px) { #chatbot {height: 52vh !important; max-height: 52vh !important} }
"""
# Copy buttons on every message came before the input in the tab order: keep them for the
# mouse, take them out of the keyboard's way (the chat window's "copy all" stays reachable).
HEAD = """<script>
(() => { let queued = false;
  const untab = () => { queued = false; document.querySelectorAll('#chatbot .message-buttons button')
    .forEach(b => b.setAttribute('tabindex', '-1')); };
  new MutationObserver(() => { if (!queued) { queued = true; requestAnimationFrame(untab); } })
    .observe(document.documentElement, {subtree: true, childList: true}); })();
</script>"""


def refusal(exc: Refusal) -> str:
    """A refusal, said where the person looks (the stats line) and in a toast that does not
    cover the page: a raised gr.Error would put red "Error" badges over the chat and the input,
    and in an unqueued event show no reason at all."""
    gr.Warning(exc.message)
    return f"⚠️ Not sent: {exc.message}"


def refusing(outputs: Callable[[Refusal], tuple]) -> Callable:
    """For page events: a Refusal becomes `outputs(exc)` (skips and a notice)."""
    def wrap(fn: Callable) -> Callable:
        if inspect.iscoroutinefunction(fn):
            async def run(*args: Any, **kw: Any) -> Any:
                try:
                    return await fn(*args, **kw)
                except Refusal as exc:
                    return outputs(exc)
        else:
            def run(*args: Any, **kw: Any) -> Any:  # type: ignore[misc]
                try:
                    return fn(*args, **kw)
                except Refusal as exc:
                    return outputs(exc)
        return functools.update_wrapper(run, fn)
    return wrap


def as_error(fn: Callable) -> Callable:
    """For API events: a Refusal becomes the gr.Error Gradio sends its client."""
    if inspect.isasyncgenfunction(fn):
        async def gen(*args: Any, **kw: Any) -> Any:
            try:
                async for out in fn(*args, **kw):
                    yield out
            except Refusal as exc:
                raise gr.Error(exc.message, title=exc.title) from None
        return functools.update_wrapper(gen, fn)

    async def run(*args: Any, **kw: Any) -> Any:
        try:
            return await fn(*args, **kw)
        except Refusal as exc:
            raise gr.Error(exc.message, title=exc.title) from None
    return functools.update_wrapper(run, fn)


class Buttons:
    """Send and Stop: one shows at a time (fresh update dicts: Gradio edits them in place)."""

    def __init__(self, busy: bool):
        self.busy = busy

    def __iter__(self) -> Iterator[dict]:
        yield from (gr.update(visible=not self.busy), gr.update(visible=self.busy))


BUSY_BUTTONS, IDLE_BUTTONS = Buttons(True), Buttons(False)


def input_box(images: bool, max_chars: int, max_image_mb: float, placeholder: str, **kw: Any) -> Any:
    """The message box: text, or, when a model takes images, text and images (the clip
    button, or a file dropped on it; the size limit said in the box)."""
    if not images:
        return gr.Textbox(show_label=False, placeholder=placeholder, **kw)
    return gr.MultimodalTextbox(
        show_label=False, sources=["upload"], file_types=["image"], file_count="multiple",
        placeholder=f"{placeholder}; add images (up to {MAX_IMAGES_PER_MESSAGE}, "
                    f"{max_image_mb:g} MB each) with the clip or by dropping them here",
        submit_btn=False, max_plain_text_length=max_chars * 4, **kw)


def text_of_event(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("text") or value.get("content") or "")
    if isinstance(value, list):
        return "".join(text_of_event(v) for v in value)
    return "" if value is None else str(value)


def system_hint(system: str) -> str:
    system = " ".join((system or "").split())
    if not system:
        return ""
    return (f"System prompt active: “{system[:90]}{'…' if len(system) > 90 else ''}” "
            "(change it in the side panel, under Generation settings)")


def counter_js(limit: int) -> str:
    """A character counter in the browser, no server round trip per keystroke."""
    return ("(t) => { const n = [...((typeof t === 'string' ? t : t?.text) || '')].length; if (n <= %d * 0.8) return ''; "
            "const over = n > %d; return `<span class=\"${over ? 'over' : ''}\">${n.toLocaleString()} / "
            "%s characters${over ? ' — too long to send: please shorten it' : ''}</span>`; }"
            % (limit, limit, f"{limit:,}"))
