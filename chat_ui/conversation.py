"""The conversations behind the chat page and its API, without Gradio.

One source of truth: every conversation lives in the store (chat_ui/store.py), keyed by a random
per-browser id (the page keeps it in the browser's localStorage); the page only shows it. Every
action reads the chat from the store and writes it back: one that changes a chat while a reply
is written (Clear, Undo, Retry, Edit, Continue, switching chats) first stops the reply and waits
until it has let go and saved what it had. What is kept in memory is keyed by chat (which reply
is in progress), never shared between visitors.

A reply is checked once (`Form`: the system prompt and sampling settings; `Engine.prepare`: the
request fits the model) before the question is saved, then written by a task of its own
(`LiveReply`), within the app's generation slots (`Limits`). The page reads it through a plain
streaming route (chat_ui/stream.py), the API through Gradio's queue; a reply nobody reads is
stopped and saved as far as it got.
"""
from __future__ import annotations

import asyncio
import hashlib
import threading
from dataclasses import dataclass
from typing import Any, Callable

from loguru import logger

from infer_engine import Engine, EngineError, InvalidRequest, SamplingParams
from infer_engine.settings import check_text

from .history import TOO_LONG, error_message, stats_line, to_engine_messages, without_last_reply
from .images import MAX_IMAGES_PER_MESSAGE, from_upload, uploaded_paths
from .replies import (BUSY, LiveReply, NoImages, Refusal, Refused, Turns, log_reply, settings_dict, stats_error,
                      stream_reply, visitor_message)
from .settings import AppSettings
from .visitors import Downloads, Uploads
from .store import Chat, Store, StoreError, chat_from_json, new_browser_id, new_chat, valid_browser_id

__all__ = ["BUSY", "Conversations", "Form", "Limits", "LiveReply", "NoImages", "Refusal", "Refused",
           "visitor_message"]

UPDATE_INTERVAL_S = 0.05   # the shortest gap between two updates a reader of a reply gets
READER_WAIT_S = 30.0       # a reply that nobody reads this long after it starts (or after its last reader left) stops
READER_GONE_S = 3.0        # ... or this long after its last reader left (a reader may come back)
MAX_UNDO_DELETES = 1000    # browsers whose last deleted chat can be restored (the oldest forgotten first)
PARTIAL_SAVE_S = 2.0       # a reply being written is saved this often (a process that stops keeps what came)
MAX_BODY_BYTES = 1024 * 1024  # the most any request but an image upload needs


@dataclass(frozen=True)
class Form:
    """The page's form as one checked value: the system prompt and the sampling settings, read
    once per action and carried with the request."""
    system: str
    sampling: SamplingParams

    def settings(self) -> dict:
        return settings_dict(self.sampling)


@dataclass(frozen=True)
class Limits:
    """The app's limits, computed once from its settings and engines and handed down."""
    concurrency: int          # replies generated at once
    queue: int                # replies waiting for a generation slot, at most
    max_updates_per_s: float  # streamed updates per second, all readers together
    upload_mb: float          # largest image upload (0: the app takes no uploads)

    @classmethod
    def of(cls, settings: AppSettings, engines: list[Engine]) -> "Limits":
        images = any(e.accepts_images for e in engines)
        return cls(concurrency=settings.concurrency or max(1, engines[0].max_concurrency),
                   queue=settings.queue_size, max_updates_per_s=settings.max_updates_per_s,
                   upload_mb=settings.max_image_mb if images else 0.0)

    @property
    def max_body_bytes(self) -> int:
        return int(MAX_IMAGES_PER_MESSAGE * self.upload_mb * 2**20) + MAX_BODY_BYTES if self.upload_mb \
            else MAX_BODY_BYTES


def chat_sid(ptr: dict) -> str:
    """A chat's name in engine sessions and log lines: the browser id is a bearer token, so a
    hash of it."""
    return f"{hashlib.sha256(ptr['browser'].encode()).hexdigest()[:12]}:{ptr['chat']}"


def _with_ratings(messages: list[dict], stored: list[dict]) -> list[dict]:
    """`messages` as a reply saves them, with the 👍/👎 the visitor gave meanwhile to the messages
    they share with the stored chat (a rating given while the reply streamed was lost)."""
    out = []
    for i, m in enumerate(messages):
        same = i < len(stored) and stored[i].get("role") == m.get("role") and stored[i].get("content") == m.get("content")
        if same and "feedback" in stored[i]:
            m = {**m, "feedback": stored[i]["feedback"]}
        elif same and "feedback" in m:
            m = {k: v for k, v in m.items() if k != "feedback"}  # taken back meanwhile
        out.append(m)
    return out


def check_ok(text: str) -> bool:
    try:
        check_text(text, "text")
        return True
    except InvalidRequest:
        return False


def question(text: str, images: list[str]) -> dict:
    """A question as the chat keeps it: its images (data URLs) with it, if it has any."""
    return {"role": "user", "content": text, **({"images": images} if images else {})}


class Conversations:
    def __init__(self, engine: Engine, store: Store, settings: AppSettings, limits: Limits, label: str):
        self.engine, self.store, self.settings, self.limits, self.label = engine, store, settings, limits, label
        self.images = limits.upload_mb > 0
        self.turns = Turns()
        self._replies: dict[str, LiveReply] = {}   # token -> reply (kept a while after it ended)
        self._running: dict[str, LiveReply] = {}   # chat -> its reply, while one is written
        self._slots = asyncio.Semaphore(limits.concurrency)  # generation slots (bound to the loop on first use)
        self._waiting = 0
        self._deleted: dict[str, Chat] = {}  # browser -> its last deleted chat (Undo)
        self.uploads = Uploads(int(settings.upload_mb_per_10min * 2**20))  # who uploaded which image
        self.downloads = Downloads()  # exports waiting for their browser to fetch them
        self._decoding = threading.BoundedSemaphore(2)
        self.store.expire()

    # -- who and what -------------------------------------------------------------------
    def session(self, ptr: dict | None) -> tuple[dict, Chat]:
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
        return ptr, self._settled_chat(ptr, chat)

    def _settled_chat(self, ptr: dict, chat: Chat) -> Chat:
        """The chat, with a reply that a stopped process left behind settled: what it had written
        (saved as it went) is kept and marked cut; a question it never answered gets a notice
        (so it is not sent again, and the next question follows a well-formed conversation)."""
        last = chat.messages[-1] if chat.messages else None
        stale = last is not None and (last.get("partial") or (last["role"] == "user" and not last.get("error")))
        if not stale or chat_sid(ptr) in self._running or self.turns.active(chat_sid(ptr)):
            return chat

        def settle(c: Chat) -> None:
            end = c.messages[-1] if c.messages else None
            if end is not None and end.get("partial"):
                c.messages[-1] = {**{k: v for k, v in end.items() if k != "partial"}, "finish": "cut"}
            elif end is not None and end["role"] == "user" and not end.get("error"):
                c.messages.append(error_message("No answer: the app stopped before it could reply. Please send it "
                                                "again."))
        settled, _ = self.store.update(ptr["browser"], chat.id, settle)
        return settled or chat

    def first_chat(self, browser: str) -> tuple[dict, Chat]:
        """A returning browser's latest chat (a new one for a new browser)."""
        browser = browser if valid_browser_id(browser) else new_browser_id()
        chats = self.store.chats(browser)
        return self.session({"browser": browser, "chat": chats[0].id if chats else None})

    def text(self, text: Any, what: str = "message") -> str:
        text = text or ""
        if isinstance(text, str) and text.startswith(TOO_LONG) and text[len(TOO_LONG):].isdigit() \
                and len(text) < 40:  # the page sent only the length of a message over the limit
            length = int(text[len(TOO_LONG):])
        else:
            text = text.strip()
            length = len(text)
        if length > self.settings.max_input_chars or text.startswith(TOO_LONG):
            raise Refusal(f"Your {what} has {length:,} characters; the limit is "
                          f"{self.settings.max_input_chars:,}. Please shorten it.")
        try:
            check_text(text, what)
        except InvalidRequest:
            raise Refusal(f"Your {what} holds characters that are not valid text (a lone UTF-16 "
                          "surrogate); please retype it.") from None
        return text

    def message(self, value: Any, visitor: str | None = None) -> tuple[str, list[str]]:
        """A message as the input box (or an API client) gives it, text or {"text", "files"}:
        its text, checked, and its images as the chat keeps them (Refusal if one is refused).
        With `visitor` (the page and the API give it), only files that visitor uploaded."""
        files = None
        if isinstance(value, dict):
            value, files = value.get("text"), value.get("files")
        if value is not None and not isinstance(value, str):
            raise Refusal("Your message must be text.")
        text = self.text(value)
        if not files:
            return text, []
        if not self.images:
            raise Refusal(f"This model ({self.label}) takes no images, only text.")
        if not isinstance(files, list) or len(files) > MAX_IMAGES_PER_MESSAGE:
            raise Refusal(f"At most {MAX_IMAGES_PER_MESSAGE} images in one message.")
        try:
            paths = uploaded_paths(files)
            if visitor is not None and not all(self.uploads.owned(visitor, p) for p in paths):
                raise Refusal("That image cannot be used: it was not uploaded from this browser.")
            with self._decoding:  # a few decodes at once: memory stays bounded, other visitors go on
                return text, [from_upload(p, p.name, int(self.settings.max_image_mb * 2**20)) for p in paths]
        except InvalidRequest as exc:
            raise Refusal(f"That image cannot be used. {exc.message}.") from None

    async def message_async(self, value: Any, visitor: str | None = None) -> tuple[str, list[str]]:
        """`message`, its image files read off the event loop."""
        if isinstance(value, dict) and value.get("files"):
            return await asyncio.to_thread(self.message, value, visitor)
        return self.message(value, visitor)

    def form(self, system: Any, max_new_tokens: Any, temperature: Any, top_p: Any, top_k: Any,
             repetition_penalty: Any) -> Form:
        """The form's values, checked once (Refusal naming what is wrong)."""
        system = self.text(system, "system prompt")
        try:
            sampling = SamplingParams(max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                                      top_p=float(top_p), top_k=int(top_k),
                                      repetition_penalty=float(repetition_penalty)).validate()
        except (InvalidRequest, TypeError, ValueError) as exc:
            raise Refusal(f"Invalid setting: {exc}") from None
        return Form(system, sampling)

    def max_new_cap(self) -> int:
        """The Max new tokens slider's top: the context minus room for a prompt."""
        n = self.engine.session_len
        return max(16, n - max(256, n // 8)) if n else max(4096, self.settings.max_new_tokens)

    def default_settings(self) -> dict:
        s = SamplingParams()
        return dict(max_new_tokens=min(self.settings.max_new_tokens, self.max_new_cap()),
                    temperature=self.settings.temperature, top_p=s.top_p, top_k=s.top_k,
                    repetition_penalty=s.repetition_penalty)

    def chat_settings(self, chat: Chat) -> dict:
        return {**self.default_settings(), **chat.settings}

    # -- replies ------------------------------------------------------------------------
    def interval(self) -> float:
        """Seconds between two updates a reader gets: the app sends at most
        `max_updates_per_s` in all (one user sees 20 a second, 64 users about 8 each)."""
        return max(UPDATE_INTERVAL_S, len(self._running) / self.limits.max_updates_per_s)

    def reply(self, token: str) -> LiveReply | None:
        return self._replies.get(token)

    def running(self, ptr: dict) -> LiveReply | None:
        return self._running.get(chat_sid(ptr))

    def busy(self) -> bool:
        """A reply is being written or saved (tests wait for rest)."""
        return bool(len(self.turns) or self._running)

    async def interrupt(self, ptr: dict) -> bool:
        """Stop the chat's reply, if one is written, and wait until it has saved what it had;
        True if one was."""
        sid = chat_sid(ptr)
        was = self.turns.active(sid) or sid in self._running
        if sid in self._running:
            self._running[sid].interrupted = True  # an action took the chat over: it shows it
        self.turns.release(sid)
        self.engine.cancel(sid)
        await self.turns.settled(sid)
        return was

    def _begin(self, ptr: dict, chat: Chat, change: Callable[[list[dict]], list[dict]], form: Form,
               continue_final: bool = False) -> LiveReply:
        """Claim the chat, check the request fits (nothing changed if not: Refusal), apply
        `change` to its messages, save them with the form's settings and start the reply."""
        sid = chat_sid(ptr)
        claim = self.turns.claim(sid)
        try:
            if self._waiting >= self.limits.queue:
                raise Refusal("The app is busy: too many replies are waiting. Please try again in a minute.")
            messages = change(list(chat.messages))
            gen = self.engine.prepare(to_engine_messages(messages, form.system), form.sampling,
                                      continue_final=continue_final)
        except EngineError as exc:
            self.turns.release(sid, claim)
            raise Refused(visitor_message(exc)) from None
        except BaseException:
            self.turns.release(sid, claim)
            raise

        def apply(c: Chat) -> None:
            c.messages, c.system, c.settings = messages, form.system, form.settings()
            if c.title in ("", "New chat"):
                first = next((m["content"] for m in messages if m["role"] == "user"), "")
                c.title = " ".join(first.split())[:40] or "New chat"
        try:
            chat, notice = self.store.update(ptr["browser"], chat.id, apply)
        except BaseException:  # a full disk, a chat over the size limit: said, and the chat released
            self.turns.release(sid, claim)
            raise
        if continue_final:
            live = LiveReply(sid, chat.messages[:-1], chat.messages[-1]["content"])
        else:
            live = LiveReply(sid, list(chat.messages))
        live.notice = notice
        self._replies[live.token] = self._running[sid] = live
        asyncio.get_running_loop().create_task(self._write(live, dict(ptr), gen, claim))
        self._watch(live)
        return live

    def _watch(self, live: LiveReply, after: float = READER_WAIT_S) -> None:
        """Stop the reply if nobody reads it `after` seconds from now (the page that sent it
        is gone; what came is saved)."""
        def check() -> None:
            if not live.done and live.readers == 0 and not live.interrupted:
                logger.info("chat session={} nobody reads the reply: stopped", live.sid)
                self.turns.release(live.sid)
                self.engine.cancel(live.sid)
        asyncio.get_running_loop().call_later(after, check)

    async def read(self, live: LiveReply):
        """Read `live` as it is written (an async generator of it); the reply stops soon after
        its last reader left before its end."""
        live.readers += 1
        try:
            async for update in live.updates(self.interval):
                yield update
        finally:
            live.readers -= 1
            if not live.done and live.readers == 0:  # the page went away (or reloads): keep what came
                self._watch(live, READER_GONE_S)

    async def _write(self, live: LiveReply, ptr: dict, gen: Any, claim: int) -> None:
        """The reply, written: within a generation slot, saved at the end (stopped or not), the
        chat released."""
        sid = live.sid
        settled = self.turns.streaming(sid)
        usage, status, saved = None, "ok", asyncio.get_running_loop().time()
        try:
            self._waiting += 1
            try:
                await self._slots.acquire()
            finally:
                self._waiting -= 1
            try:
                if not self.turns.holds(sid, claim):  # stopped while waiting for a slot
                    status = "stopped before it started"
                    return
                try:
                    async for text, u in stream_reply(self.engine, gen, sid):
                        usage = u or usage
                        live.add(text, stats_line(usage) if usage else None)
                        if live.text and asyncio.get_running_loop().time() - saved > PARTIAL_SAVE_S:
                            saved = asyncio.get_running_loop().time()  # what came survives the process
                            self._save_partial(ptr, live)
                except EngineError as exc:
                    status = f"{type(exc).__name__}: {exc.message}"
                    live.error, live.stats = exc, stats_error(exc)
            finally:
                self._slots.release()
        finally:
            live.finish = usage.finish_reason if usage is not None else None
            final = self._final(live)
            try:
                if self.store.get(ptr["browser"], ptr["chat"]) is not None:
                    self.store.update(ptr["browser"], ptr["chat"], lambda c: setattr(c, "messages",
                                                                                     _with_ratings(final, c.messages)))
            finally:
                self.turns.release(sid, claim)
                self.turns.done(sid, settled)
                if self._running.get(sid) is live:
                    del self._running[sid]
                live.end(final)
                asyncio.get_running_loop().call_later(READER_WAIT_S, self._replies.pop, live.token, None)
                log_reply(sid, usage, status)

    def _save_partial(self, ptr: dict, live: LiveReply) -> None:
        """The reply so far, in the store (marked partial until it ends): a process that stops
        mid-reply leaves it there (`_settled_chat` marks it cut)."""
        partial = live.base + [{"role": "assistant", "content": live.text, "partial": True}]
        try:
            self.store.update(ptr["browser"], ptr["chat"],
                              lambda c: setattr(c, "messages", _with_ratings(partial, c.messages)))
        except StoreError as exc:  # the reply goes on; its end is saved (or said) as usual
            logger.warning("chat session={} partial reply not saved: {}", live.sid, exc)

    @staticmethod
    def _final(live: LiveReply) -> list[dict]:
        """The chat as it is saved: the reply, or what came and a notice of what failed. A
        question the engine refused before any output is marked unanswered (not sent again)."""
        messages = list(live.base)
        reply = [{"role": "assistant", "content": live.text, **({"finish": live.finish} if live.finish else {})}] \
            if live.text or live.error is None else []
        if live.error is None:
            return messages + reply
        notice = error_message(visitor_message(live.error))
        if isinstance(live.error, InvalidRequest) and not live.text and messages:
            messages[-1] = dict(messages[-1], error=True)
        return messages + reply + [notice]

    # -- the actions ----------------------------------------------------------------------
    async def send(self, ptr: dict, chat: Chat, value: Any, form: Form, visitor: str | None = None) -> LiveReply | None:
        """A message into the visitor's chat (`session`'s pair): saved and answered (None: an
        empty message, nothing done)."""
        text, images = await self.message_async(value, visitor)
        if not text and not images:
            return None
        return self._begin(ptr, chat, lambda ms: ms + [question(text, images)], form)

    async def _regenerating(self, ptr: dict) -> tuple[dict, Chat]:
        ptr, _ = self.session(ptr)
        await self.interrupt(ptr)
        return self.session(ptr)

    async def retry(self, ptr: dict, form: Form) -> tuple[dict, LiveReply | None]:
        """A new reply to the last question (None: there is none)."""
        ptr, chat = await self._regenerating(ptr)
        if not without_last_reply(chat.messages):
            return ptr, None
        return ptr, self._begin(ptr, chat, without_last_reply, form)

    async def edit(self, ptr: dict, index: int, text: Any, form: Form) -> tuple[dict, LiveReply | None]:
        """A question changed: what came after it dropped, answered anew (None: not a question)."""
        text = self.text(text)
        ptr, chat = await self._regenerating(ptr)
        if not text or not 0 <= index < len(chat.messages) or chat.messages[index]["role"] != "user":
            return ptr, None
        return ptr, self._begin(ptr, chat, lambda ms: ms[:index] + [{**ms[index], "content": text}], form)

    async def continue_reply(self, ptr: dict, form: Form) -> tuple[dict, LiveReply]:
        """The model goes on with its last reply (after Stop or a cut at max tokens)."""
        ptr, chat = await self._regenerating(ptr)
        last = chat.messages[-1] if chat.messages else None
        if not last or last["role"] != "assistant" or last.get("error") or not last["content"]:
            raise Refusal("There is no reply to continue: send a message first.")
        if last.get("finish") == "stop":
            raise Refusal("The last reply is complete (the model ended it): there is nothing to continue. "
                          "Retry gives another answer.")
        return ptr, self._begin(ptr, chat, lambda ms: ms, form, continue_final=True)

    async def stop(self, ptr: dict) -> tuple[Chat | None, bool]:
        """Stop: the reply so far stays. (The chat, whether a reply was running.)"""
        ptr, _ = self.session(ptr)
        was = await self.interrupt(ptr)
        return self.store.get(ptr["browser"], ptr["chat"]), was

    async def undo(self, ptr: dict, index: int | None = None) -> tuple[Chat, str]:
        """Drop the last question (or the one at `index`) and what came after; (the chat, the
        question's text)."""
        ptr, _ = self.session(ptr)
        await self.interrupt(ptr)
        asked = ""

        def change(c: Chat) -> None:
            nonlocal asked
            at = index if index is not None else \
                max((i for i, m in enumerate(c.messages) if m["role"] == "user"), default=None)
            if at is not None and 0 <= at < len(c.messages):
                asked = c.messages[at]["content"] if c.messages[at]["role"] == "user" else ""
                c.messages = c.messages[:at]
        chat, _ = self.store.update(ptr["browser"], ptr["chat"], change)
        return chat, asked

    async def clear(self, ptr: dict) -> None:
        ptr, _ = self.session(ptr)
        await self.interrupt(ptr)
        self.store.update(ptr["browser"], ptr["chat"], lambda c: setattr(c, "messages", []))

    def like(self, ptr: dict, index: int, value: str | None) -> None:
        """👍 / 👎 (value "like" / "dislike", None: taken back) on a reply, kept with the chat."""
        ptr, _ = self.session(ptr)

        def change(c: Chat) -> None:
            if 0 <= index < len(c.messages) and c.messages[index]["role"] == "assistant" \
                    and not c.messages[index].get("error"):  # a notice is nothing to rate
                if value:
                    c.messages[index]["feedback"] = value
                else:
                    c.messages[index].pop("feedback", None)
        self.store.update(ptr["browser"], ptr["chat"], change)

    # -- the chat list ----------------------------------------------------------------------
    async def new_chat(self, ptr: dict, system: str, settings: dict) -> tuple[dict, Chat, str]:
        """A new chat, shown; (ptr, chat, the store's notice when older chats went to make room)."""
        ptr, _ = self.session(ptr)
        await self.interrupt(ptr)
        chat = new_chat(system=system if check_ok(system) else "", settings=settings)
        notice = self.store.save(ptr["browser"], chat)
        return {**ptr, "chat": chat.id}, chat, notice

    async def switch(self, ptr: dict, chat_id: str) -> tuple[dict, Chat]:
        ptr, _ = self.session(ptr)
        if chat_id and chat_id != ptr["chat"]:
            await self.interrupt(ptr)
        chat = self.store.get(ptr["browser"], chat_id)
        if chat is None:  # gone meanwhile (another tab deleted it)
            return self.session(ptr)
        return {**ptr, "chat": chat.id}, chat

    def rename(self, ptr: dict, title: str) -> dict:
        ptr, chat = self.session(ptr)
        title = (title or "").strip()[:80]
        if title and check_ok(title):
            self.store.update(ptr["browser"], chat.id, lambda c: setattr(c, "title", title))
        return ptr

    async def delete(self, ptr: dict) -> tuple[dict, Chat, Chat]:
        """Delete the chat; (the chat now shown, the one deleted). The last deleted chat of a
        browser can be restored (`restore`) while this process runs."""
        ptr, chat = self.session(ptr)
        await self.interrupt(ptr)
        chat = self.store.get(ptr["browser"], chat.id) or chat  # as the reply left it
        self.store.delete(ptr["browser"], chat.id)
        self._deleted[ptr["browser"]] = chat
        while len(self._deleted) > MAX_UNDO_DELETES:
            self._deleted.pop(next(iter(self._deleted)))
        rest = self.store.chats(ptr["browser"])
        ptr, shown = self.session({"browser": ptr["browser"], "chat": rest[0].id if rest else None})
        return ptr, shown, chat

    def restore(self, ptr: dict) -> tuple[dict, Chat] | None:
        """The browser's last deleted chat, back in the store and shown (None: nothing to restore)."""
        ptr, _ = self.session(ptr)
        chat = self._deleted.pop(ptr["browser"], None)
        if chat is None:
            return None
        self.store.save(ptr["browser"], chat)
        return {**ptr, "chat": chat.id}, chat

    def save_settings(self, ptr: dict, system: str, settings: dict) -> dict:
        """The chat's system prompt and sampling settings, kept as they are changed."""
        ptr, chat = self.session(ptr)
        if len(system or "") > self.settings.max_input_chars or not check_ok(system or ""):
            raise Refusal(f"The system prompt has {len(system):,} characters; the limit is "
                          f"{self.settings.max_input_chars:,}. It was not saved.")

        def change(c: Chat) -> None:
            c.system, c.settings = (system or "").strip(), settings
        self.store.update(ptr["browser"], chat.id, change)
        return ptr

    async def import_chat(self, ptr: dict, text: str) -> tuple[dict, Chat, str]:
        ptr, _ = self.session(ptr)
        if len(text or "") > MAX_BODY_BYTES // 2:
            raise Refusal("That chat is too large to import here.")
        try:
            chat = chat_from_json(text or "")
        except ValueError as exc:
            raise Refusal(f"Could not import the chat: {exc}") from None
        for m in chat.messages:
            if not check_ok(m["content"]):
                raise Refusal("Could not import the chat: it holds text that is not valid Unicode.")
        await self.interrupt(ptr)
        notice = self.store.save(ptr["browser"], chat)
        return {**ptr, "chat": chat.id}, chat, notice or "Chat imported."
