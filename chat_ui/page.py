"""What the page's parts share: its style and script, the message box, the Send/Stop pair, and
how a refusal is shown."""
from __future__ import annotations

import functools
import inspect
import json
from typing import Any, Callable, Iterator

import gradio as gr

from .history import TOO_LONG
from .images import MAX_IMAGES_PER_MESSAGE
from .replies import Refusal

WELCOME = ("### Welcome\nAsk anything below, or start with an example. Your chats are kept for this browser "
           "in the side panel (the arrow at the top left): switch, rename, export or delete them there.")
LATEX = [{"left": "$$", "right": "$$", "display": True}, {"left": "$", "right": "$", "display": False},
         {"left": "\\(", "right": "\\)", "display": False}, {"left": "\\[", "right": "\\]", "display": True}]

# Text and buttons at >= 4.5:1 contrast (Gradio's orange Send was 2.8:1, its red Stop 3.8:1, the
# placeholder 1.9:1, the selected tab 2.8:1, the footer 1.9:1), the message box's focus ring at
# >= 3:1, the model's name readable; on a phone the input bar stays in view while a reply streams
# and the controls are big enough to hit (44 px tall; message icons 28 px apart by 4).
CSS = """
#stats, #stats_a, #stats_b, #counter {font-size: 0.85em; color: #374151; min-height: 1.5em}
#counter.over, #counter .over {color: #b91c1c; font-weight: 600}
#send, #cmp_send {background: #c2410c !important; color: #ffffff !important; border-color: #c2410c !important}
#stop, #cmp_stop {background: #b91c1c !important; color: #ffffff !important; border-color: #b91c1c !important}
#input textarea::placeholder, #cmp_input textarea::placeholder, #rename_box input::placeholder,
#rename_box textarea::placeholder {color: #4b5563 !important; opacity: 1}
#input textarea:focus, #cmp_input textarea:focus {border-color: #c2410c !important; box-shadow: 0 0 0 2px #c2410c !important}
button[role="tab"].selected {color: #9a3412 !important}
footer, footer a, footer button, footer .divider {color: #374151 !important}
#chatbot label[data-testid="block-label"], #chat_a label[data-testid="block-label"],
#chat_b label[data-testid="block-label"] {font-size: 0.95rem !important; color: #1f2937 !important; font-weight: 600}
#chatbot .message-buttons:focus-within {opacity: 1 !important}
#banner {background: #fef3c7; color: #78350f; border-radius: 6px; padding: 0 0.75em}
#system_hint {font-size: 0.85em; color: #374151}
#input_bar {position: sticky; bottom: 0; z-index: 20; background: var(--background-fill-primary)}
@media (max-width: 640px) {
  #chatbot {height: 52vh !important; max-height: 52vh !important}
  #retry, #continue, #undo, #clear {min-height: 44px !important}
  #chatbot .message-buttons {gap: 4px}
  #chatbot .message-buttons button {min-width: 28px !important; min-height: 28px !important}
}
"""
# The page's keyboard and small fixes, in the browser: the side panel's controls leave the tab
# order while it is closed (inert); an error notice shows no Like/Dislike (nothing to rate);
# Escape stops a reply; after Stop (clicked or pressed) the focus is back in the message box.
HEAD = """<script>
(() => { let queued = false;
  const tidy = () => { queued = false;
    const side = document.querySelector('.sidebar'), content = side && side.querySelector('.sidebar-content');
    if (content) { const open = side.classList.contains('open') || side.getBoundingClientRect().left >= 0;
      if (open) content.removeAttribute('inert'); else content.setAttribute('inert', ''); }
    document.querySelectorAll('#chatbot [data-testid="bot"]').forEach(b => { const row = b.closest('.message-row');
      if (!row) return; const notice = (b.innerText || '').trim().startsWith('\u26a0');
      row.querySelectorAll('button[aria-label="Like"], button[aria-label="Dislike"]')
        .forEach(x => { x.style.display = notice ? 'none' : ''; }); }); };
  const later = () => { if (!queued) { queued = true; requestAnimationFrame(tidy); } };
  new MutationObserver(later).observe(document.documentElement, {subtree: true, childList: true});
  let watched = null;  // the side panel opens and closes by its style and class
  setInterval(() => { const side = document.querySelector('.sidebar');
    if (side && side !== watched) { watched = side;
      new MutationObserver(later).observe(side, {attributes: true, attributeFilter: ['class', 'style']}); later(); } }, 500);
  const toInput = () => { const t = document.querySelector('#input textarea'); if (t) t.focus(); };
  document.addEventListener('click', e => { if (e.target.closest && e.target.closest('#stop')) setTimeout(toInput, 0); }, true);
  document.addEventListener('keydown', e => { if (e.key !== 'Escape') return;
    const stop = document.querySelector('#stop'); if (stop && stop.offsetParent !== null) { e.preventDefault(); stop.click(); } },
    true); })();
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


def too_long_js(limit: int) -> str:
    """Before Send: a message over the limit goes to the server as its length alone, so that a
    paste of megabytes gets the same "too long" refusal as one character too many (the whole
    text would be refused at the request body's 1 MB limit, with bare "Error" badges)."""
    return ("(m, ...rest) => { const t = typeof m === 'string' ? m : (m && m.text) || ''; const n = [...t].length; "
            "if (n <= %d) return [m, ...rest]; const k = %s + n; "
            "return [typeof m === 'string' ? k : {...m, text: k, files: []}, ...rest]; }"
            % (limit, json.dumps(TOO_LONG)))


def counter_js(limit: int) -> str:
    """A character counter in the browser, no server round trip per keystroke."""
    return ("(t) => { const n = [...((typeof t === 'string' ? t : t?.text) || '')].length; if (n <= %d * 0.8) return ''; "
            "const over = n > %d; return `<span class=\"${over ? 'over' : ''}\">${n.toLocaleString()} / "
            "%s characters${over ? ' — too long to send: please shorten it' : ''}</span>`; }"
            % (limit, limit, f"{limit:,}"))
