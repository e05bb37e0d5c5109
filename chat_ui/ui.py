"""The Gradio chat page over the Engine interface.

One source of truth: every conversation lives in the store (chat_ui/store.py), keyed by a random
per-browser id kept in the browser's localStorage (gr.BrowserState); the page only shows it. Every
control reads the chat from the store and writes it back: one that changes a chat while a reply
streams (Clear, Undo, Retry, Edit, Continue, switching chats) first stops the reply and waits
until it has let go and saved what it had. What ChatUI keeps in memory is keyed by chat (which
reply is in progress), never shared between visitors.

Streaming is built for many users in one process (scripts/bench_app.py): handlers are async
generators fed by the engine's stream on a pooled thread, updates share a budget, and a streamed
update carries only the chat window and the stats line. In the page, Send is two events, as
gr.ChatInterface does it: one that takes the message at once, one that streams the reply; the
API endpoint /send is one event.
"""
from __future__ import annotations

import asyncio
import functools
import hashlib
import importlib.util
import os
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator

import gradio as gr
from loguru import logger
from starlette.middleware import Middleware

from infer_engine import Engine, EngineError, InvalidRequest, SamplingParams, Usage
from infer_engine.aio import ThreadedStream
from infer_engine.asgi import RequestLimits
from infer_engine.errors import (AuthenticationFailed, BackendUnavailable, ContextOverflow,
                                 ModelNotFound, SessionBusy)
from infer_engine.settings import check_text

from .history import (display, error_message, feedback_of, stats_line, to_engine_messages,
                      without_last_reply)
from .images import MAX_IMAGES_PER_MESSAGE, from_upload, uploaded_paths
from .settings import AppSettings
from .store import (Chat, MemoryStore, SQLiteStore, Store, chat_from_json, export_json, markdown,
                    new_browser_id, new_chat, valid_browser_id)

UPDATE_INTERVAL_S = 0.05  # the shortest gap between two updates of a streaming reply
MAX_BODY_BYTES = 1024 * 1024  # the most any request but an image upload needs
BUSY = "A reply is still being written in this chat: wait for it to finish, or press Stop."
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


def refusal(exc: gr.Error) -> str:
    """A refusal, said where the person looks (the stats line) and in a toast that does not
    cover the page: a raised gr.Error would put red "Error" badges over the chat and the input
    (issue seen with the busy Send), and in an unqueued event show no reason at all."""
    gr.Warning(exc.message)
    return f"⚠️ Not sent: {exc.message}"


def _refusing(outputs: Callable[[gr.Error], tuple]) -> Callable:
    """For page events: a gr.Error from the checks becomes `outputs(exc)` (skips and a notice)."""
    def wrap(fn: Callable) -> Callable:
        if asyncio.iscoroutinefunction(fn):
            async def run_async(*args: Any, **kw: Any) -> Any:
                try:
                    return await fn(*args, **kw)
                except gr.Error as exc:
                    return outputs(exc)
            run = run_async
        else:
            def run_sync(*args: Any, **kw: Any) -> Any:
                try:
                    return fn(*args, **kw)
                except gr.Error as exc:
                    return outputs(exc)
            run = run_sync
        functools.update_wrapper(run, fn)
        return run
    return wrap


class _Turns:
    """Which chats have a reply in progress: one at a time per chat. A claim is taken before
    the chat changes and held until the reply has saved, so a second Send while one streams is
    refused, readably, instead of one reply overwriting the other."""

    def __init__(self) -> None:
        self._claims: dict[str, int] = {}
        self._settled: dict[str, asyncio.Event] = {}  # set when the chat's reply has saved
        self._lock = threading.Lock()
        self._next = 0

    def claim(self, sid: str) -> int:
        with self._lock:
            if sid in self._claims:
                raise gr.Error(BUSY)
            self._next += 1
            self._claims[sid] = self._next
            return self._next

    def holds(self, sid: str, claim: int | None) -> bool:
        with self._lock:
            return claim is not None and self._claims.get(sid) == claim

    def release(self, sid: str, claim: int | None = None) -> None:
        """Release `claim` (any claim of the chat when None: Stop, Clear, Undo, page closed)."""
        with self._lock:
            if claim is None or self._claims.get(sid) == claim:
                self._claims.pop(sid, None)

    def streaming(self, sid: str) -> asyncio.Event:
        """Mark the chat's reply as running; set the returned event once it has saved."""
        event = asyncio.Event()
        with self._lock:
            self._settled[sid] = event
        return event

    def done(self, sid: str, event: asyncio.Event) -> None:
        event.set()
        with self._lock:
            if self._settled.get(sid) is event:
                del self._settled[sid]

    async def settled(self, sid: str, timeout: float = 10.0) -> None:
        with self._lock:
            event = self._settled.get(sid)
        if event is not None:
            try:
                await asyncio.wait_for(event.wait(), timeout)
            except asyncio.TimeoutError:
                logger.warning("chat session={} still saving its reply after {} s", sid, timeout)

    def active(self, sid: str) -> bool:
        with self._lock:
            return sid in self._claims or sid in self._settled

    def __len__(self) -> int:
        return len(self._claims)


def make_store(settings: AppSettings) -> Store:
    limits = dict(max_bytes_per_browser=int(settings.history_max_mb * 2**20), retention_days=settings.history_days)
    if settings.no_history:
        return MemoryStore(**limits)
    return SQLiteStore(settings.history_path, **limits)


class ChatUI:
    def __init__(self, engine: Engine, settings: AppSettings, compare: Engine | None = None,
                 label: str | None = None, compare_label: str | None = None, store: Store | None = None):
        self.engine, self.compare_engine, self.settings = engine, compare, settings
        self.store = store or make_store(settings)
        self.label = label or settings.model_label or _name_of(engine)
        self.compare_label = compare_label or settings.compare_label or (
            _name_of(compare) if compare else "")
        # a vision-language model on either side: the inputs take images, the app takes uploads
        self.images = engine.accepts_images or bool(compare is not None and compare.accepts_images)
        self._turns = _Turns()
        self._live: dict[str, list[dict]] = {}  # chat -> its messages as last shown, while streaming
        self.store.expire()

    # -- helpers ------------------------------------------------------------------------
    @staticmethod
    def _sid(request: gr.Request | None, which: str) -> str:
        return f"{getattr(request, 'session_hash', None) or 'anonymous'}:{which}"

    @staticmethod
    def _chat_sid(ptr: dict) -> str:
        # the browser id is a bearer token: engine session ids and log lines carry a hash of it
        return f"{hashlib.sha256(ptr['browser'].encode()).hexdigest()[:12]}:{ptr['chat']}"

    def _session(self, ptr: dict | None) -> tuple[dict, Chat]:
        """The visitor's browser id and current chat (made on first use: API clients have no
        page to give them one)."""
        ptr = dict(ptr or {})
        if not valid_browser_id(ptr.get("browser")):
            ptr["browser"] = new_browser_id()
        chat = self.store.get(ptr["browser"], ptr.get("chat"))
        if chat is None:
            chat = new_chat(system=self.settings.system_prompt)
            self.store.save(ptr["browser"], chat)
        ptr["chat"] = chat.id
        return ptr, chat

    def _check_input(self, text: str, what: str = "message") -> str:
        text = (text or "").strip()
        if len(text) > self.settings.max_input_chars:
            raise gr.Error(f"Your {what} has {len(text):,} characters; the limit is "
                           f"{self.settings.max_input_chars:,}. Please shorten it.")
        try:
            check_text(text, what)
        except InvalidRequest:
            raise gr.Error(f"Your {what} holds characters that are not valid text (a lone UTF-16 "
                           "surrogate); please retype it.") from None
        return text

    def _message_in(self, value: Any) -> tuple[str, list[str]]:
        """A message as the input box (or an API client) gives it, text or {"text", "files"}:
        its text, checked, and its images as the chat keeps them (gr.Error if one is refused)."""
        files = None
        if isinstance(value, dict):
            value, files = value.get("text"), value.get("files")
        if value is not None and not isinstance(value, str):
            raise gr.Error("Your message must be text.")
        text = self._check_input(value)
        if not files:
            return text, []
        if not self.images:
            raise gr.Error(f"This model ({self.label}) takes no images, only text.")
        if not isinstance(files, list) or len(files) > MAX_IMAGES_PER_MESSAGE:
            raise gr.Error(f"At most {MAX_IMAGES_PER_MESSAGE} images in one message.")
        try:
            return text, [from_upload(p, p.name, int(self.settings.max_image_mb * 2**20))
                          for p in uploaded_paths(files)]
        except InvalidRequest as exc:
            raise gr.Error(f"That image cannot be used. {exc.message}.") from None

    @staticmethod
    def _sampling(max_new_tokens: float, temperature: float, top_p: float, top_k: float,
                  repetition_penalty: float) -> SamplingParams:
        try:
            return SamplingParams(max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                                  top_p=float(top_p), top_k=int(top_k),
                                  repetition_penalty=float(repetition_penalty)).validate()
        except (InvalidRequest, TypeError, ValueError) as exc:
            raise gr.Error(f"Invalid setting: {exc}") from None

    def _max_new_cap(self) -> int:
        """The Max new tokens slider's top: the context minus room for a prompt."""
        n = self.engine.session_len
        return max(16, n - max(256, n // 8)) if n else max(4096, self.settings.max_new_tokens)

    def _interval(self) -> float:
        """Seconds between two updates of a streaming reply. Every update costs the server a
        render of the chat (~1.5 ms of the app's CPU, measured with yappi), so the app spends
        at most `max_updates_per_s` in all: one user sees 20 updates a second, 64 users about 8
        each, 128 about 4."""
        return max(UPDATE_INTERVAL_S, len(self._turns) / self.settings.max_updates_per_s)

    async def _interrupt(self, engine: Engine | None, sid: str) -> None:
        """Stop the chat's reply, if one streams, and wait until it has saved what it had."""
        self._turns.release(sid)
        if engine is not None:
            engine.cancel(sid)
        await self._turns.settled(sid)

    async def _stream_reply(self, engine: Engine, messages: list[dict], system: str,
                            sampling: SamplingParams, sid: str, continue_final: bool = False
                            ) -> AsyncIterator[tuple[list[dict], str, Exception | None]]:
        """The messages with a reply (or, with continue_final, the last reply extended) as it
        streams; yields (messages, stats line, the error that refused the request before any
        output, if one did). The engine's stream runs on a thread of its own; this coroutine
        takes what has arrived and shows it at most once per `_interval()`."""
        msgs = to_engine_messages(messages, system)
        messages = list(messages)
        if continue_final:
            prefix = messages.pop()["content"]
        else:
            prefix = ""
        messages.append({"role": "assistant", "content": prefix})
        text, usage, status = prefix, None, "ok"

        def open_stream() -> Iterator:
            engine.wait_session_free(sid, timeout=10)  # a stopped reply may still be letting go
            return engine.stream_chat(msgs, sampling, sid, continue_final=continue_final)

        loop = asyncio.get_running_loop()
        stream, shown = ThreadedStream(open_stream), None
        try:
            while items := await stream.take():
                for delta in items:
                    text += delta.text
                    usage = delta.usage or usage
                if usage is None and shown is not None:
                    wait = shown + self._interval() - loop.time()
                    if wait > 0:  # what arrives meanwhile goes out with the next update
                        await stream.wait_end(wait)  # the end of the reply is shown at once
                shown = loop.time()
                messages[-1] = {"role": "assistant", "content": text}
                yield messages, stats_line(usage) if usage else "…", None
        except EngineError as exc:
            status = f"{type(exc).__name__}: {exc.message}"
            refused = exc if isinstance(exc, InvalidRequest) and text == prefix else None
            if text:  # keep what came before the failure (or the reply it was to continue)
                messages[-1] = {"role": "assistant", "content": text}
                messages.append(error_message(visitor_message(exc)))
            else:
                messages[-1] = error_message(visitor_message(exc))
            yield messages, stats_error(exc), refused
        finally:
            engine.cancel(sid)  # closed early (Stop, page closed): the engine stops too
            _log_event(sid, usage, status)

    def _chat_list(self, ptr: dict) -> Any:
        chats = self.store.chats(ptr["browser"])
        return gr.update(choices=[(c.title or "New chat", c.id) for c in chats], value=ptr["chat"])

    def _chat_view(self, ptr: dict, chat: Chat) -> tuple:
        """Everything the page shows of one chat: the chat list, the chat window, its system
        prompt and sampling settings, the system-prompt hint."""
        st = {**self._default_settings(), **chat.settings}
        return (self._chat_list(ptr), gr.update(value=display(chat.messages), feedback_value=feedback_of(chat.messages)),
                chat.system, st["max_new_tokens"], st["temperature"], st["top_p"], st["top_k"],
                st["repetition_penalty"], system_hint(chat.system))

    def _default_settings(self) -> dict:
        s = SamplingParams()
        return dict(max_new_tokens=min(self.settings.max_new_tokens, self._max_new_cap()),
                    temperature=self.settings.temperature, top_p=s.top_p, top_k=s.top_k,
                    repetition_penalty=s.repetition_penalty)

    # -- page load, chat list --------------------------------------------------------------
    def on_load(self, browser: str, request: gr.Request) -> tuple:
        browser = browser if valid_browser_id(browser) else new_browser_id()
        chats = self.store.chats(browser)
        ptr, chat = self._session({"browser": browser, "chat": chats[0].id if chats else None})
        problem = self.engine.health()
        if problem:
            logger.warning("model backend unavailable at page load: {}", problem)
        banner = gr.update(visible=bool(problem), value=(
            "⚠️ **The model server is not reachable right now.** Replies will fail until it is back; "
            "please try again in a minute." if problem else ""))
        return (browser, ptr, *self._chat_view(ptr, chat), "", banner)

    async def new_chat(self, ptr: dict, system: str, *sliders: float) -> tuple:
        ptr, _ = self._session(ptr)
        await self._interrupt(self.engine, self._chat_sid(ptr))
        chat = new_chat(system=system if check_ok(system) else "", settings=self._settings_of(*sliders))
        self.store.save(ptr["browser"], chat)
        ptr["chat"] = chat.id
        return (ptr, *self._chat_view(ptr, chat), "")

    async def switch_chat(self, ptr: dict, chat_id: str) -> tuple:
        ptr, _ = self._session(ptr)
        if chat_id and chat_id != ptr["chat"]:
            await self._interrupt(self.engine, self._chat_sid(ptr))
        chat = self.store.get(ptr["browser"], chat_id)
        if chat is None:  # gone meanwhile (another tab deleted it)
            ptr, chat = self._session(ptr)
        else:
            ptr["chat"] = chat.id
        return (ptr, *self._chat_view(ptr, chat), "")

    def rename_chat(self, ptr: dict, title: str) -> tuple:
        ptr, chat = self._session(ptr)
        title = (title or "").strip()[:80]
        if title and check_ok(title):
            self.store.update(ptr["browser"], chat.id, lambda c: setattr(c, "title", title))
        return self._chat_list(ptr), ""

    async def delete_chat(self, ptr: dict) -> tuple:
        ptr, chat = self._session(ptr)
        await self._interrupt(self.engine, self._chat_sid(ptr))
        self.store.delete(ptr["browser"], chat.id)
        rest = self.store.chats(ptr["browser"])
        ptr, chat = self._session({"browser": ptr["browser"], "chat": rest[0].id if rest else None})
        return (ptr, *self._chat_view(ptr, chat), "")

    @_refusing(lambda exc: (gr.skip(), gr.skip()))
    def save_settings(self, ptr: dict, system: str, *sliders: float) -> tuple:
        """The chat's system prompt and sampling settings, kept as they are changed."""
        ptr, chat = self._session(ptr)
        if len(system or "") > self.settings.max_input_chars or not check_ok(system or ""):
            raise gr.Error(f"The system prompt has {len(system):,} characters; the limit is "
                           f"{self.settings.max_input_chars:,}. It was not saved.")
        settings = self._settings_of(*sliders)

        def change(c: Chat) -> None:
            c.system, c.settings = (system or "").strip(), settings
        self.store.update(ptr["browser"], chat.id, change)
        return ptr, system_hint(system or "")

    @staticmethod
    def _settings_of(max_new_tokens: float, temperature: float, top_p: float, top_k: float,
                     repetition_penalty: float) -> dict:
        try:
            return dict(max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_p=float(top_p),
                        top_k=int(top_k), repetition_penalty=float(repetition_penalty))
        except (TypeError, ValueError):
            return {}

    def export_chat(self, ptr: dict, fmt: str) -> Any:
        ptr, chat = self._session(ptr)
        is_md = fmt.lower().startswith("markdown")
        body = markdown(chat) if is_md else export_json(chat)
        safe = "".join(ch for ch in chat.title if ch.isalnum() or ch in " -_")[:40].strip() or "chat"
        folder = Path(tempfile.mkdtemp(prefix="chat-export-"))
        path = folder / f"{safe}.{'md' if is_md else 'json'}"
        path.write_text(body, encoding="utf-8")
        return gr.update(value=str(path), visible=True)

    @_refusing(lambda exc: (*(gr.skip(),) * 10, refusal(exc), gr.skip()))
    async def import_chat(self, ptr: dict, text: str) -> tuple:
        ptr, _ = self._session(ptr)
        if len(text or "") > MAX_BODY_BYTES // 2:
            raise gr.Error("That chat is too large to import here.")
        try:
            chat = chat_from_json(text or "")
        except ValueError as exc:
            raise gr.Error(f"Could not import the chat: {exc}") from None
        for m in chat.messages:
            if not check_ok(m["content"]):
                raise gr.Error("Could not import the chat: it holds text that is not valid Unicode.")
        await self._interrupt(self.engine, self._chat_sid(ptr))
        notice = self.store.save(ptr["browser"], chat)
        ptr["chat"] = chat.id
        return (ptr, *self._chat_view(ptr, chat), notice or "Chat imported.", "")

    # -- chat tab: sending and the reply ----------------------------------------------------
    def _begin(self, ptr: dict, chat: Chat, change: Callable[[list[dict]], list[dict]], system: str,
               sampling: SamplingParams, continue_final: bool = False) -> tuple[int, Chat]:
        """Claim the chat, check the request fits (nothing changed if not: gr.Error), apply
        `change` to its messages and save them with the settings used."""
        sid = self._chat_sid(ptr)
        claim = self._turns.claim(sid)
        try:
            messages = change(list(chat.messages))
            self.engine.check(to_engine_messages(messages, system), sampling, continue_final=continue_final)
        except EngineError as exc:
            self._turns.release(sid, claim)
            raise Refused(visitor_message(exc), title="Not sent") from None
        except BaseException:
            self._turns.release(sid, claim)
            raise

        def apply(c: Chat) -> None:
            c.messages, c.system, c.settings = messages, system, _settings_dict(sampling)
            if c.title in ("", "New chat"):
                first = next((m["content"] for m in messages if m["role"] == "user"), "")
                c.title = " ".join(first.split())[:40] or "New chat"
        chat, notice = self.store.update(ptr["browser"], chat.id, apply)
        if notice:
            gr.Info(notice)
        return claim, chat

    def accept(self, message: str, ptr: dict, system: str, max_new_tokens: float, temperature: float,
               top_p: float, top_k: float, repetition_penalty: float) -> tuple:
        """Send, in the page (runs at once, unqueued): claim the chat, show the message, empty
        the box, turn Send into Stop. The reply streams in the event that follows (`reply`)."""
        ptr, chat = self._session(ptr)
        try:
            message, images = self._message_in(message)
            system = self._check_input(system, "system prompt")
            sampling = self._sampling(max_new_tokens, temperature, top_p, top_k, repetition_penalty)
            if not message and not images:
                return (gr.skip(),) * 8
            claim, chat = self._begin(ptr, chat, lambda ms: ms + [_question(message, images)], system, sampling)
        except gr.Error as exc:  # the message stays in the box; the page says why, in the chat too
            shown = gr.skip() if exc.message == BUSY else \
                display(chat.messages + [error_message(f"Not sent: {exc.message}")])  # (not kept)
            return (gr.skip(), ptr, shown, refusal(exc), None, gr.skip(), gr.skip(), gr.skip())
        return ("", ptr, display(chat.messages), "…", {"claim": claim}, self._chat_list(ptr), *BUSY_BUTTONS)

    async def _answer(self, ptr: dict, pending: dict | None, sampling: SamplingParams
                      ) -> AsyncIterator[tuple[list[dict], str]]:
        """Stream the reply the chat is waiting for (its claim taken by an accept step), save it
        at the end, stopped or not, and release the chat."""
        sid = self._chat_sid(ptr)
        claim = (pending or {}).get("claim")
        if not self._turns.holds(sid, claim):  # nothing accepted, or stopped meanwhile
            return
        settled = self._turns.streaming(sid)
        chat = self.store.get(ptr["browser"], ptr["chat"])
        final = None
        try:
            if chat is None:
                return
            cont = bool((pending or {}).get("continue"))
            async for msgs, stats, refused in self._stream_reply(self.engine, chat.messages, chat.system, sampling,
                                                                 sid, continue_final=cont):
                if refused is not None and not cont:  # refused by the backend: not part of the chat
                    msgs = msgs[:-2] + [dict(msgs[-2], error=True), msgs[-1]]
                final = self._live[sid] = msgs  # Stop, Clear, ... find the reply so far here
                yield msgs, stats
        finally:
            final = self._live.pop(sid, final)
            if final is not None:
                self.store.update(ptr["browser"], ptr["chat"], lambda c: setattr(c, "messages", final))
            pending["interrupted"] = not self._turns.holds(sid, claim)  # a control took the chat over
            self._turns.release(sid, claim)
            self._turns.done(sid, settled)

    async def reply(self, pending: dict | None, ptr: dict, max_new_tokens: float, temperature: float,
                    top_p: float, top_k: float, repetition_penalty: float) -> AsyncIterator[tuple]:
        sampling = self._sampling(max_new_tokens, temperature, top_p, top_k, repetition_penalty)
        pending = dict(pending or {})
        sid = self._chat_sid(self._session(ptr)[0])
        async for msgs, stats in self._answer(ptr, pending, sampling):
            if not self._turns.holds(sid, pending.get("claim")):
                continue  # a control took the chat over: it shows the chat; this saves and ends
            yield display(msgs), stats
        if pending.get("interrupted"):
            # Gradio ends an event by sending its last value again; after Clear / Undo / Retry
            # that would be the reply as it was, overwriting what the control showed (seen here:
            # the exchange back after Undo). The last value of an interrupted reply is "unchanged".
            yield gr.skip(), gr.skip()

    def idle(self, ptr: dict) -> tuple:
        """After a reply: Stop turns back into Send; the chat list shows the chat's title."""
        return (*IDLE_BUTTONS, self._chat_list(self._session(ptr)[0]))

    async def stop(self, ptr: dict) -> tuple:
        """Stop: the reply so far stays, in the page and in the chat."""
        ptr, _ = self._session(ptr)
        sid = self._chat_sid(ptr)
        was_running = self._turns.active(sid) or sid in self._live
        await self._interrupt(self.engine, sid)
        chat = self.store.get(ptr["browser"], ptr["chat"])
        stats = "Stopped." if was_running else gr.skip()
        return (display(chat.messages) if chat else gr.skip(), stats, *IDLE_BUTTONS)

    async def _regenerating(self, ptr: dict, system: str, sliders: tuple, text: Any = None) -> tuple:
        """What Retry, Edit and Continue start with: their settings (and Edit's new text)
        checked, the chat's reply (if one streams) stopped and let go, and the chat as the store
        has it then."""
        sampling = self._sampling(*sliders)
        system = self._check_input(system, "system prompt")
        if text is not None:
            text = self._check_input(text)
        ptr, _ = self._session(ptr)
        await self._interrupt(self.engine, self._chat_sid(ptr))
        return ptr, self.store.get(ptr["browser"], ptr["chat"]), system, sampling, text

    @_refusing(lambda exc: (gr.skip(), gr.skip(), refusal(exc), None, gr.skip(), gr.skip()))
    async def retry(self, ptr: dict, system: str, *sliders: float) -> tuple:
        """Retry (also the chat window's ↻): a new reply to the last question."""
        ptr, chat, system, sampling, _ = await self._regenerating(ptr, system, sliders)
        if not without_last_reply(chat.messages):
            return (*(gr.skip(),) * 4, *IDLE_BUTTONS)
        claim, chat = self._begin(ptr, chat, without_last_reply, system, sampling)
        return (ptr, display(chat.messages), "…", {"claim": claim}, *BUSY_BUTTONS)

    @_refusing(lambda exc: (gr.skip(), gr.skip(), refusal(exc), None, gr.skip(), gr.skip()))
    async def edit(self, ptr: dict, system: str, max_new_tokens: float, temperature: float, top_p: float,
                   top_k: float, repetition_penalty: float, evt: gr.EditData) -> tuple:
        """The chat window's ✎ on a question: change it, drop what came after, answer anew."""
        ptr, chat, system, sampling, text = await self._regenerating(
            ptr, system, (max_new_tokens, temperature, top_p, top_k, repetition_penalty), _text(evt.value))
        index = evt.index if isinstance(evt.index, int) else evt.index[0]
        if not text or not 0 <= index < len(chat.messages) or chat.messages[index]["role"] != "user":
            return (gr.skip(), display(chat.messages), gr.skip(), None, *IDLE_BUTTONS)
        claim, chat = self._begin(ptr, chat, lambda ms: ms[:index] + [{**ms[index], "content": text}],
                                  system, sampling)
        return (ptr, display(chat.messages), "…", {"claim": claim}, *BUSY_BUTTONS)

    @_refusing(lambda exc: (gr.skip(), gr.skip(), refusal(exc), None, gr.skip(), gr.skip()))
    async def continue_reply(self, ptr: dict, system: str, *sliders: float) -> tuple:
        """Continue: the model goes on with its last reply (after Stop or a cut at max tokens)."""
        ptr, chat, system, sampling, _ = await self._regenerating(ptr, system, sliders)
        last = chat.messages[-1] if chat.messages else None
        if not last or last["role"] != "assistant" or last.get("error") or not last["content"]:
            raise gr.Error("There is no reply to continue: send a message first.")
        claim, chat = self._begin(ptr, chat, lambda ms: ms, system, sampling, continue_final=True)
        return (ptr, display(chat.messages), "…", {"claim": claim, "continue": True}, *BUSY_BUTTONS)

    async def undo(self, ptr: dict, box: str, evt: gr.UndoData | None = None) -> tuple:
        """Undo (also the chat window's ↶): drop the last question and its reply; the question
        goes back into the box, if the box is empty."""
        ptr, _ = self._session(ptr)
        await self._interrupt(self.engine, self._chat_sid(ptr))
        question = ""

        def change(c: Chat) -> None:
            nonlocal question
            at = evt.index if evt is not None and isinstance(evt.index, int) else \
                max((i for i, m in enumerate(c.messages) if m["role"] == "user"), default=None)
            if at is not None and 0 <= at < len(c.messages):
                question = c.messages[at]["content"] if c.messages[at]["role"] == "user" else ""
                c.messages = c.messages[:at]
        chat, _ = self.store.update(ptr["browser"], ptr["chat"], change)
        box_value = question if question and not _text(box).strip() else gr.skip()
        return (display(chat.messages), box_value, "", *IDLE_BUTTONS)

    async def clear(self, ptr: dict) -> tuple:
        """Clear (also the chat window's 🗑): this chat starts over, in the store too."""
        ptr, _ = self._session(ptr)
        await self._interrupt(self.engine, self._chat_sid(ptr))
        self.store.update(ptr["browser"], ptr["chat"], lambda c: setattr(c, "messages", []))
        return ([], "", *IDLE_BUTTONS)

    def like(self, ptr: dict, evt: gr.LikeData) -> None:
        """👍 / 👎 on a reply, kept with the chat (python -m chat_ui.export_feedback)."""
        ptr, _ = self._session(ptr)
        index = evt.index if isinstance(evt.index, int) else evt.index[0]
        liked = evt.liked
        value = "like" if liked in (True, "Like") else "dislike" if liked in (False, "Dislike") else None

        def change(c: Chat) -> None:
            if 0 <= index < len(c.messages) and c.messages[index]["role"] == "assistant" \
                    and not c.messages[index].get("error"):  # a notice is nothing to rate
                if value:
                    c.messages[index]["feedback"] = value
                else:
                    c.messages[index].pop("feedback", None)
        self.store.update(ptr["browser"], ptr["chat"], change)

    def accept_example(self, ptr: dict, system: str, max_new_tokens: float, temperature: float, top_p: float,
                       top_k: float, repetition_penalty: float, evt: gr.SelectData) -> tuple:
        """An example in the empty chat, clicked: sent at once."""
        text = _text(evt.value.get("text") if isinstance(evt.value, dict) else evt.value)
        out = self.accept(text, ptr, system, max_new_tokens, temperature, top_p, top_k, repetition_penalty)
        return out[1:]  # no box to empty

    # -- the API: one call per action (gradio_client, /gradio_api/call/<name>) ------------------
    async def send(self, message: str, ptr: dict, system: str, max_new_tokens: float,
                   temperature: float, top_p: float, top_k: float, repetition_penalty: float
                   ) -> AsyncIterator[tuple]:
        """/send: the message in (text, or {"text", "files"} for an image model), the reply
        streamed out: (chat, box, stats); the chat as text (images are kept, not sent back)."""
        message, images = await asyncio.to_thread(self._message_in, message)
        system = self._check_input(system, "system prompt")
        sampling = self._sampling(max_new_tokens, temperature, top_p, top_k, repetition_penalty)
        ptr, chat = self._session(ptr)
        if not message and not images:
            yield display(chat.messages, images=False), "", "", ptr
            return
        try:
            claim, chat = self._begin(ptr, chat, lambda ms: ms + [_question(message, images)], system, sampling)
        except Refused as exc:  # refused before anything changed: shown in the chat, message kept
            yield display(chat.messages + [error_message(exc.message)], images=False), message, "", ptr
            return
        first = True
        async for msgs, stats in self._answer(ptr, {"claim": claim}, sampling):
            yield display(msgs, images=False), "", stats, (ptr if first else gr.skip())
            first = False
        if first:
            yield display(chat.messages, images=False), "", "", ptr

    async def api_retry(self, ptr: dict, system: str, *sliders: float) -> AsyncIterator[tuple]:
        ptr, _ = self._session(ptr)
        out = await self.retry(ptr, system, *sliders)
        pending = out[3]
        if not isinstance(pending, dict):
            chat = self.store.get(ptr["browser"], ptr["chat"])
            yield display(chat.messages, images=False), "", ptr
            return
        async for msgs, stats in self._answer(ptr, pending, self._sampling(*sliders)):
            yield display(msgs, images=False), stats, ptr

    def _api_chat(self, ptr: dict) -> list[dict]:
        chat = self.store.get(ptr["browser"], ptr["chat"])
        return display(chat.messages if chat else [], images=False)

    async def api_stop(self, ptr: dict) -> tuple:
        ptr, _ = self._session(ptr)
        _, stats, *_ = await self.stop(ptr)
        return self._api_chat(ptr), stats

    async def api_undo(self, ptr: dict) -> tuple:
        ptr, _ = self._session(ptr)
        _, box, stats, *_ = await self.undo(ptr, "")
        return self._api_chat(ptr), box if isinstance(box, str) else "", stats

    async def api_clear(self, ptr: dict) -> tuple:
        chat, stats, *_ = await self.clear(ptr)
        return chat, "", stats

    # -- compare tab --------------------------------------------------------------------
    def _compare_engines(self, request: gr.Request) -> list[tuple[Engine, str]]:
        return [(self.engine, self._sid(request, "compare-a")),
                (self.compare_engine, self._sid(request, "compare-b"))]

    @_refusing(lambda exc: (gr.skip(),) * 5 + (refusal(exc), gr.skip(), None))
    def accept_compare(self, message: str, hist_a: list[dict], hist_b: list[dict], system: str,
                       max_new_tokens: float, temperature: float, top_p: float, top_k: float,
                       repetition_penalty: float, request: gr.Request) -> tuple:
        message, images = self._message_in(message)
        system = self._check_input(system, "system prompt")
        sampling = self._sampling(max_new_tokens, temperature, top_p, top_k, repetition_penalty)
        if not message and not images:
            return (gr.skip(),) * 8
        sid = self._sid(request, "compare")
        claim = self._turns.claim(sid)
        try:
            hists = self._compare_turn(_question(message, images), [hist_a, hist_b], system, sampling, request)
        except BaseException:
            self._turns.release(sid, claim)
            raise
        return ("", display(hists[0]), display(hists[1]), hists[0], hists[1],
                *("…" if h[-1]["role"] == "user" else "" for h in hists), claim)

    def _compare_turn(self, question: dict, hists: list[list[dict] | None], system: str,
                      sampling: SamplingParams, request: gr.Request) -> list[list[dict]]:
        """Both histories with the question. A side whose model cannot take it (a text-only
        model shown an image, too long for its context) gets a notice saying why in place of a
        reply; the other side answers. gr.Error if neither can."""
        out, refused = [], []
        for (engine, _), label, h in zip(self._compare_engines(request), (self.label, self.compare_label), hists):
            h = list(h or []) + [question]
            try:
                if question.get("images") and not engine.accepts_images:
                    raise NoImages(f"{label} takes no images, only text")
                engine.check(to_engine_messages(h, system), sampling)
            except EngineError as exc:
                refused.append(exc)
                h.append(error_message(visitor_message(exc)))
            out.append(h)
        if len(refused) == len(out):
            raise gr.Error(visitor_message(refused[0]), title="Not sent")
        return out

    async def reply_compare(self, claim: int | None, hist_a: list[dict], hist_b: list[dict], system: str,
                            max_new_tokens: float, temperature: float, top_p: float, top_k: float,
                            repetition_penalty: float, request: gr.Request) -> AsyncIterator[tuple]:
        sid = self._sid(request, "compare")
        if not self._turns.holds(sid, claim):
            return
        settled = self._turns.streaming(sid)
        try:
            sampling = self._sampling(max_new_tokens, temperature, top_p, top_k, repetition_penalty)
            async for a, b, sa, sb in self._both_answer([list(hist_a), list(hist_b)], system, sampling, request):
                if not self._turns.holds(sid, claim):
                    break  # Stop / Clear took over: nothing more of this reply goes out
                yield display(a), display(b), a, b, sa, sb
            if not self._turns.holds(sid, claim):  # see `reply`
                yield (gr.skip(),) * 6
        finally:
            self._turns.release(sid, claim)
            self._turns.done(sid, settled)

    async def compare(self, message: str, hist_a: list[dict], hist_b: list[dict], system: str,
                      max_new_tokens: float, temperature: float, top_p: float, top_k: float,
                      repetition_penalty: float, request: gr.Request) -> AsyncIterator[tuple]:
        """/compare, as one API call: both models answer the same question at the same time,
        each with its own history."""
        message, images = await asyncio.to_thread(self._message_in, message)
        system = self._check_input(system, "system prompt")
        sampling = self._sampling(max_new_tokens, temperature, top_p, top_k, repetition_penalty)
        if not message and not images:
            yield display(hist_a or [], images=False), display(hist_b or [], images=False), hist_a, hist_b, "", "", ""
            return
        sid = self._sid(request, "compare")
        claim = self._turns.claim(sid)
        try:
            hists = self._compare_turn(_question(message, images), [hist_a, hist_b], system, sampling, request)
            async for a, b, sa, sb in self._both_answer(hists, system, sampling, request):
                yield display(a, images=False), display(b, images=False), a, b, "", sa, sb
        finally:
            self._turns.release(sid, claim)

    async def _both_answer(self, hists: list[list[dict]], system: str, sampling: SamplingParams,
                           request: gr.Request) -> AsyncIterator[tuple]:
        """Both models' replies as they stream: (messages a, messages b, stats a, stats b). A
        side that ends in a notice (its model refused the question) does not stream."""
        asks = [h[-1]["role"] == "user" for h in hists]
        streams = {i: self._stream_reply(engine, hists[i], system, sampling, sid)
                   for i, (engine, sid) in enumerate(self._compare_engines(request)) if asks[i]}
        shown, stats = list(hists), ["…" if ask else "" for ask in asks]
        pending = {asyncio.ensure_future(anext(s)): i for i, s in streams.items()}
        try:
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    i = pending.pop(task)
                    try:
                        shown[i], stats[i], _ = task.result()
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

    async def stop_compare(self, request: gr.Request) -> None:
        sid = self._sid(request, "compare")
        self._turns.release(sid)
        for engine, engine_sid in self._compare_engines(request):
            if engine is not None:
                engine.cancel(engine_sid)
        await self._turns.settled(sid)

    async def clear_compare(self, request: gr.Request) -> tuple:
        await self.stop_compare(request)
        return [], [], [], [], "", "", ""

    async def on_leave(self, request: gr.Request) -> None:
        """A visitor closed the page: the Compare tab stops. A chat's reply, if one streams, is
        stopped with the stream and saved as far as it got (the chat is there on return)."""
        await self.stop_compare(request)

    # -- layout -------------------------------------------------------------------------
    def _input_box(self, placeholder: str, **kw: Any) -> Any:
        """The message box: text, or, when a model takes images, text and images (the clip
        button, or a file dropped on it; the size limit said in the box)."""
        if not self.images:
            return gr.Textbox(show_label=False, placeholder=placeholder, **kw)
        return gr.MultimodalTextbox(
            show_label=False, sources=["upload"], file_types=["image"], file_count="multiple",
            placeholder=f"{placeholder}; add images (up to {MAX_IMAGES_PER_MESSAGE}, "
                        f"{self.settings.max_image_mb:g} MB each) with the clip or by dropping them here",
            submit_btn=False, max_plain_text_length=self.settings.max_input_chars * 4, **kw)

    def build(self) -> gr.Blocks:
        s = self.settings
        gen = dict(concurrency_limit=s.concurrency or self.engine.max_concurrency, concurrency_id="generate")
        # Gradio recomputes its monitoring summary with pandas over up to 10,000 recorded events
        # after every event (GRADIO_ANALYTICS_CACHE_FREQUENCY=1): ~2 ms per event, growing with
        # traffic (yappi). The app has no monitoring page: keep a short record, summed rarely.
        os.environ.setdefault("GRADIO_ANALYTICS_MAX_EVENTS", "1000")
        os.environ.setdefault("GRADIO_ANALYTICS_CACHE_FREQUENCY", "1000")
        secret = self.store.secret() if isinstance(self.store, SQLiteStore) else None
        defaults = self._default_settings()
        examples = [{"text": e} for e in s.example_list()]
        # No analytics calls from a public deployment; Gradio's cache (uploads, images shown in
        # the chat window) is swept hourly of files older than an hour.
        with gr.Blocks(title=s.title, analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
            browser = gr.BrowserState("", storage_key="chat-app-browser", secret=secret)
            ptr = gr.State({})
            with gr.Sidebar(open=False, label="Chats"):
                new_btn = gr.Button("+ New chat", size="sm", elem_id="new_chat")
                chat_list = gr.Radio(choices=[], label="Your chats (kept in this browser)", elem_id="chat_list")
                with gr.Row():
                    title_box = gr.Textbox(label="Rename this chat", placeholder="New title", scale=3,
                                           elem_id="rename_box")
                    rename_btn = gr.Button("Rename", size="sm", scale=1, elem_id="rename")
                delete_btn = gr.Button("Delete this chat", size="sm", variant="secondary", elem_id="delete_chat")
                with gr.Accordion("Generation settings", open=False, elem_id="settings"):
                    system = gr.Textbox(s.system_prompt, label="System prompt", lines=3,
                                        elem_id="system")
                    max_new = gr.Slider(1, self._max_new_cap(), value=defaults["max_new_tokens"], step=1,
                                        label="Max new tokens", elem_id="max_new")
                    temperature = gr.Slider(0, 2, value=defaults["temperature"], step=0.05,
                                            label="Temperature (0 = greedy)", elem_id="temperature")
                    top_p = gr.Slider(0.05, 1, value=defaults["top_p"], step=0.05, label="Top-p")
                    top_k = gr.Slider(0, 100, value=defaults["top_k"], step=1, label="Top-k (0 = off)")
                    rep = gr.Slider(1, 2, value=defaults["repetition_penalty"], step=0.01,
                                    label="Repetition penalty")
                with gr.Accordion("Export / import", open=False, elem_id="export"):
                    fmt = gr.Radio(["JSON (training format)", "Markdown"], value="JSON (training format)",
                                   label="Export this chat as")
                    export_btn = gr.Button("Export", size="sm", elem_id="export_btn")
                    export_file = gr.File(label="Download", visible=False, interactive=False, elem_id="export_file")
                    import_box = gr.Textbox(label="Import a chat: paste its JSON", lines=3, elem_id="import_box")
                    import_btn = gr.Button("Import", size="sm", elem_id="import_btn")
                    import_note = gr.Markdown("")
            sliders = [max_new, temperature, top_p, top_k, rep]
            gr.Markdown(f"## {s.title}")
            banner = gr.Markdown("", visible=False, elem_id="banner")
            hint = gr.Markdown("", elem_id="system_hint")
            with gr.Tabs():
                with gr.Tab("Chat"):
                    pending = gr.State(None)
                    chatbot = gr.Chatbot(label=self.label, height=480, elem_id="chatbot", placeholder=WELCOME,
                                         examples=examples or None, editable="user",
                                         feedback_options=("Like", "Dislike"), buttons=["copy", "copy_all"],
                                         latex_delimiters=LATEX, autoscroll=True)
                    stats = gr.Markdown("", elem_id="stats")
                    with gr.Row(elem_id="input_bar"):
                        box = self._input_box(label="Message", autofocus=True, lines=1, max_lines=8, scale=8,
                                              elem_id="input", placeholder="Type a message and press Enter")
                        send_btn = gr.Button("Send", variant="primary", scale=1, min_width=80, elem_id="send")
                        stop_btn = gr.Button("Stop", variant="stop", scale=1, min_width=80, elem_id="stop",
                                             visible=False)
                    counter = gr.HTML("", elem_id="counter")
                    with gr.Row():
                        small = dict(size="sm", min_width=60)  # one row on a phone too
                        retry_btn = gr.Button("Retry", elem_id="retry", **small)
                        continue_btn = gr.Button("Continue", elem_id="continue", **small)
                        undo_btn = gr.Button("Undo", elem_id="undo", **small)
                        clear_btn = gr.Button("Clear", elem_id="clear", **small)
                    buttons = [send_btn, stop_btn]
                    view = [chat_list, chatbot, system, *sliders, hint]

                    # a character counter in the browser, no server round trip per keystroke
                    box.change(None, [box], [counter], js=_counter_js(s.max_input_chars), queue=False)

                    def then_reply(ev: Any) -> Any:
                        streaming = ev.success(self.reply, [pending, ptr, *sliders], [chatbot, stats],
                                               api_visibility="private", **gen)
                        streaming.then(self.idle, [ptr], [*buttons, chat_list], api_visibility="private",
                                       queue=False)
                        return streaming

                    # queued (no limit, so at once) for its warnings to reach the page as toasts
                    ev_accept = gr.on([box.submit, send_btn.click], self.accept, [box, ptr, system, *sliders],
                                      [box, ptr, chatbot, stats, pending, chat_list, *buttons],
                                      concurrency_limit=None, api_visibility="private", trigger_mode="once")
                    ev_example = chatbot.example_select(self.accept_example, [ptr, system, *sliders],
                                                        [ptr, chatbot, stats, pending, chat_list, *buttons],
                                                        concurrency_limit=None, api_visibility="private")
                    # (page events are private, under names of their own: the API's names stay free)
                    ev_retry = gr.on([retry_btn.click, chatbot.retry], self.retry, [ptr, system, *sliders],
                                     [ptr, chatbot, stats, pending, *buttons], api_name="page_retry",
                                     api_visibility="private")
                    ev_edit = chatbot.edit(self.edit, [ptr, system, *sliders], [ptr, chatbot, stats, pending, *buttons],
                                           api_visibility="private")
                    ev_cont = continue_btn.click(self.continue_reply, [ptr, system, *sliders],
                                                 [ptr, chatbot, stats, pending, *buttons], api_visibility="private")
                    replies = [then_reply(ev) for ev in (ev_accept, ev_example, ev_retry, ev_edit, ev_cont)]

                    # the API, one call per action
                    api = gr.Button(visible=False)
                    ev_api = api.click(self.send, [box, ptr, system, *sliders], [chatbot, box, stats, ptr],
                                       api_name="send", preprocess=False, postprocess=False, **gen)
                    api_retry = gr.Button(visible=False)
                    ev_api_retry = api_retry.click(self.api_retry, [ptr, system, *sliders], [chatbot, stats, ptr],
                                                   api_name="retry", preprocess=False, postprocess=False, **gen)
                    running = replies + [ev_api, ev_api_retry]
                    gr.Button(visible=False).click(self.api_undo, [ptr], [chatbot, box, stats], api_name="undo",
                                                   postprocess=False)
                    gr.Button(visible=False).click(self.api_clear, [ptr], [chatbot, box, stats], api_name="clear",
                                                   postprocess=False)
                    gr.Button(visible=False).click(self.api_stop, [ptr], [chatbot, stats], api_name="stop",
                                                   postprocess=False)

                    stop_btn.click(self.stop, [ptr], [chatbot, stats, *buttons], cancels=running,
                                   api_name="page_stop", api_visibility="private")
                    gr.on([undo_btn.click, chatbot.undo], self.undo, [ptr, box], [chatbot, box, stats, *buttons],
                          cancels=running, api_name="page_undo", api_visibility="private")
                    gr.on([clear_btn.click, chatbot.clear], self.clear, [ptr], [chatbot, stats, *buttons],
                          cancels=running, api_name="page_clear", api_visibility="private")
                    chatbot.like(self.like, [ptr], None, api_visibility="private", queue=False)

                    new_btn.click(self.new_chat, [ptr, system, *sliders], [ptr, *view, stats], cancels=running,
                                  api_visibility="private")
                    chat_list.input(self.switch_chat, [ptr, chat_list], [ptr, *view, stats], cancels=running,
                                    api_visibility="private")
                    gr.on([rename_btn.click, title_box.submit], self.rename_chat, [ptr, title_box],
                          [chat_list, title_box], api_visibility="private", queue=False)
                    delete_btn.click(self.delete_chat, [ptr], [ptr, *view, stats], cancels=running,
                                     api_visibility="private")
                    gr.on([system.blur, *[sl.release for sl in sliders]], self.save_settings, [ptr, system, *sliders],
                          [ptr, hint], api_visibility="private", concurrency_limit=None)
                    export_btn.click(self.export_chat, [ptr, fmt], [export_file], api_visibility="private")
                    import_btn.click(self.import_chat, [ptr, import_box], [ptr, *view, import_note, import_box],
                                     cancels=running, api_visibility="private")
                if self.compare_engine is not None:
                    self._build_compare(system, sliders, gen)
            demo.load(self.on_load, [browser], [browser, ptr, *view, stats, banner], api_visibility="private")
            demo.unload(self.on_leave)
        demo.upload_limit_mb = s.max_image_mb if self.images else 0  # read by launch()
        return demo

    def _build_compare(self, system: Any, sliders: list, gen: dict) -> None:
        s = self.settings
        with gr.Tab("Compare"):
            hist_a, hist_b, cclaim = gr.State([]), gr.State([]), gr.State(None)
            with gr.Row():
                with gr.Column():
                    chat_a = gr.Chatbot(label=self.label, height=440, elem_id="chat_a", latex_delimiters=LATEX,
                                        buttons=["copy_all"], feedback_options=None)
                    stats_a = gr.Markdown("", elem_id="stats_a")
                with gr.Column():
                    chat_b = gr.Chatbot(label=self.compare_label, height=440, elem_id="chat_b",
                                        latex_delimiters=LATEX, buttons=["copy_all"], feedback_options=None)
                    stats_b = gr.Markdown("", elem_id="stats_b")
            with gr.Row():
                cbox = self._input_box(label="Question for both models", scale=8, elem_id="cmp_input",
                                       placeholder="One question, both models answer")
                cmp_btn = gr.Button("Ask both", variant="primary", scale=1, elem_id="cmp_send")
                cstop = gr.Button("Stop", variant="stop", scale=1, elem_id="cmp_stop")
                cclear = gr.Button("Clear", scale=1)
            if s.example_list():
                gr.Examples(s.example_list(), inputs=cbox, label="Examples")
            couts = [chat_a, chat_b, hist_a, hist_b, cbox, stats_a, stats_b]
            cin = [cbox, hist_a, hist_b, system, *sliders]
            ev_caccept = gr.on([cbox.submit, cmp_btn.click], self.accept_compare, cin,
                               [cbox, chat_a, chat_b, hist_a, hist_b, stats_a, stats_b, cclaim],
                               concurrency_limit=None, api_visibility="private", trigger_mode="once")
            ev_creply = ev_caccept.success(
                self.reply_compare, [cclaim, hist_a, hist_b, system, *sliders],
                [chat_a, chat_b, hist_a, hist_b, stats_a, stats_b], api_visibility="private", **gen)
            api_compare = gr.Button(visible=False)
            ev_capi = api_compare.click(self.compare, cin, couts, api_name="compare", preprocess=False,
                                        postprocess=False, **gen)
            crunning = [ev_creply, ev_capi]
            cstop.click(self.stop_compare, None, None, api_name="stop_compare", cancels=crunning)
            cclear.click(self.clear_compare, None, couts, api_name="clear_compare", cancels=crunning)


class NoImages(InvalidRequest):
    """An image for a model that takes only text."""


class Refused(gr.Error):
    """A request the engine refused before anything changed (too long for the context, ...)."""


class _Buttons:
    """Send and Stop: one shows at a time (fresh update dicts: Gradio edits them in place)."""

    def __iter__(self) -> Iterator[dict]:
        yield from (gr.update(visible=not self.busy), gr.update(visible=self.busy))

    def __init__(self, busy: bool):
        self.busy = busy


BUSY_BUTTONS, IDLE_BUTTONS = _Buttons(True), _Buttons(False)


def _question(text: str, images: list[str]) -> dict:
    """A question as the chat keeps it: its images (data URLs) with it, if it has any."""
    return {"role": "user", "content": text, **({"images": images} if images else {})}


def _text(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("text") or value.get("content") or "")
    if isinstance(value, list):
        return "".join(_text(v) for v in value)
    return "" if value is None else str(value)


def check_ok(text: str) -> bool:
    try:
        check_text(text, "text")
        return True
    except InvalidRequest:
        return False


def system_hint(system: str) -> str:
    system = " ".join((system or "").split())
    if not system:
        return ""
    return (f"System prompt active: “{system[:90]}{'…' if len(system) > 90 else ''}” "
            "(change it in the side panel, under Generation settings)")


def _counter_js(limit: int) -> str:
    return ("(t) => { const n = [...((typeof t === 'string' ? t : t?.text) || '')].length; if (n <= %d * 0.8) return ''; "
            "const over = n > %d; return `<span class=\"${over ? 'over' : ''}\">${n.toLocaleString()} / "
            "%s characters${over ? ' — too long to send: please shorten it' : ''}</span>`; }"
            % (limit, limit, f"{limit:,}"))


def _settings_dict(sampling: SamplingParams) -> dict:
    return dict(max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
                top_k=sampling.top_k, repetition_penalty=sampling.repetition_penalty)


def _name_of(engine: Engine) -> str:
    try:
        return engine.model_name
    except EngineError:  # a remote API that is down at start: the app still comes up
        return "model"


def visitor_message(exc: EngineError) -> str:
    """What a visitor of a public page may read: no internal URLs, hosts or stack traces
    (the log keeps the detail)."""
    if isinstance(exc, SessionBusy):
        return BUSY
    if isinstance(exc, ContextOverflow):
        return exc.message[0].upper() + exc.message[1:].replace("max_new_tokens", "Max new tokens") + "."
    if isinstance(exc, NoImages):
        return exc.message + "."
    if isinstance(exc, InvalidRequest):
        return "The model server refused the request: " + exc.message.removeprefix("api: request rejected: ")
    if isinstance(exc, BackendUnavailable):
        return "The model server is not reachable right now. Please try again in a minute."
    if isinstance(exc, AuthenticationFailed):
        return "The app could not sign in to its model server; its operator needs to check the API key."
    if isinstance(exc, ModelNotFound):
        return "The model server does not have the model this app is set up for; its operator needs to " \
               "check the settings."
    if exc.message.startswith("out of memory"):
        return "The model ran out of memory. Try a shorter conversation or fewer new tokens."
    return "The model failed to answer. Please try again."


def stats_error(exc: EngineError) -> str:
    """The stats line under a failed reply: what happened, in a few words, and what to do."""
    if isinstance(exc, ContextOverflow):
        fits = exc.max_new_tokens_that_fit
        return "Not sent: too long for the model's context. " + (
            f"Lower Max new tokens to {fits:,} or shorten the message." if fits else "Shorten the message.")
    if isinstance(exc, BackendUnavailable):
        return "No reply: the model server is not reachable. Try again in a minute."
    if isinstance(exc, SessionBusy):
        return "Not sent: a reply is still being written."
    return "No reply: " + visitor_message(exc)


def _log_event(sid: str, usage: Usage | None, status: str) -> None:
    """One line per reply: session, tokens, time to first token, finish reason, status."""
    if usage is None:
        logger.info("chat session={} status={}", sid, status)
        return
    ttft = "-" if usage.ttft_s is None else f"{usage.ttft_s * 1000:.0f}ms"
    logger.info("chat session={} prompt_tokens={} completion_tokens={} ttft={} finish={} status={}", sid,
                usage.prompt_tokens, usage.completion_tokens, ttft, usage.finish_reason, status)


def _no_matplotlib_lookups() -> None:
    """Gradio wraps every event step in `import matplotlib` (twice: MatplotlibBackendMananger);
    without matplotlib installed each attempt walks sys.path again, ~1 ms per streamed update
    (measured with yappi: a quarter of the app's CPU at 64 streams). Marking the module absent
    makes the import fail at once, exactly as it would after the walk."""
    if importlib.util.find_spec("matplotlib") is None:
        sys.modules.setdefault("matplotlib", None)


def launch(demo: gr.Blocks, settings: AppSettings, prevent_thread_lock: bool = False,
           host: str | None = None, port: int | None = None) -> Any:
    """Queue and launch with settings fit for a public deployment."""
    _no_matplotlib_lookups()
    # generation events carry their own limit (concurrency_id "generate"); Stop, Undo, Clear
    # take no time and need none
    demo.queue(max_size=settings.queue_size, default_concurrency_limit=None)
    # Gradio runs at most max_threads events at once, whatever their concurrency limits
    # (queueing.py: active_jobs): leave room for every reply the engine can run, plus the rest.
    limits = [fn.concurrency_limit for fn in demo.fns.values() if isinstance(fn.concurrency_limit, int)]
    upload_mb = getattr(demo, "upload_limit_mb", 0)
    if upload_mb:  # an image model: uploads up to MAX_IMAGES_PER_MESSAGE images of upload_mb each
        limit = Middleware(RequestLimits, max_bytes=int(MAX_IMAGES_PER_MESSAGE * upload_mb * 2**20) + MAX_BODY_BYTES)
    else:  # no component takes files: uploads are refused, and no request body may exceed 1 MB
        limit = Middleware(RequestLimits, max_bytes=MAX_BODY_BYTES, refused=("/upload",),
                           refused_reason="this app takes no uploads")
    return demo.launch(
        server_name=host or settings.host, server_port=port or settings.port,
        auth=settings.auth_pairs(), max_threads=max([40] + [n + 16 for n in limits]),
        max_file_size=f"{upload_mb:g}mb" if upload_mb else "1mb", app_kwargs={"middleware": [limit]},
        allowed_paths=[], show_error=False, ssr_mode=False, run_history=False,
        prevent_thread_lock=prevent_thread_lock, css=CSS, head=HEAD)
