"""Kept conversations: one source of truth for every chat, server-side, keyed by a random
per-browser id (never an IP address).

A chat holds its messages in the training tools' `messages` format (role + content), plus, per
message, an `error` flag (a notice shown in the page, never sent to the model) and the visitor's
`feedback` ("like" / "dislike") on replies; and the chat's own system prompt and sampling
settings. `SQLiteStore` keeps them across page reloads and server restarts (standard library,
WAL mode); `MemoryStore` keeps them for the life of the process (--no-history). Both enforce a
size cap per browser (oldest chats go first, and the caller is told) and a retention period.
"""
from __future__ import annotations

import contextlib
import json
import random
import re
import secrets
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .replies import Refusal

SETUP_WAIT_S = 60.0  # how long a starting app waits for another process holding the store
BROWSER_ID = re.compile(r"^[A-Za-z0-9_-]{32,64}$")


class StoreError(Exception):
    """The chat store cannot be opened (one line, naming the file)."""


class StoreWriteError(StoreError, Refusal):
    """A change could not be saved (a full disk, a read-only file): a refusal the visitor reads
    in words; nothing of the change stays."""


class ChatTooLarge(StoreError, Refusal):
    """One chat alone is over a browser's size limit: it cannot be kept as it would be."""


EXPIRE_EVERY_S = 600.0     # retention runs this often (not only at start-up)
EMPTY_CHAT_DAYS = 1.0      # a chat never written to goes after this long
IDLE_BROWSER_S = 600.0     # past the store's total cap, browsers idle this long lose their oldest chats first


def new_browser_id() -> str:
    return secrets.token_urlsafe(32)  # 43 characters: a bearer token, unguessable


def valid_browser_id(value: Any) -> bool:
    return isinstance(value, str) and bool(BROWSER_ID.match(value))


@dataclass
class Chat:
    id: str
    title: str = "New chat"
    system: str = ""
    settings: dict = field(default_factory=dict)
    messages: list[dict] = field(default_factory=list)
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)

    def size(self) -> int:
        return len(json.dumps(asdict(self), ensure_ascii=False).encode())


def new_chat(**kw: Any) -> Chat:
    return Chat(id=secrets.token_hex(8), **kw)


class Store:
    """What both stores do; subclasses keep the rows."""

    def __init__(self, max_bytes_per_browser: int = 10 * 2**20, max_chats_per_browser: int = 200,
                 retention_days: float = 30.0, max_total_bytes: int = 2 * 2**30):
        self.max_bytes, self.max_chats, self.retention_s = max_bytes_per_browser, max_chats_per_browser, \
            retention_days * 86400
        self.max_total = max_total_bytes
        self._lock = threading.RLock()
        self._expired_at = 0.0

    @contextlib.contextmanager
    def _transaction(self):
        """One read-modify-write, atomic for every process on the store (SQLite: a write
        transaction; in memory: the lock alone)."""
        with self._lock:
            yield

    def _total(self) -> int:  # bytes the store holds
        raise NotImplementedError

    def _oldest_idle(self, before: float, keep: str, limit: int) -> list[tuple[str, str]]:
        """(browser, chat id) of the least recently used chats not touched since `before`,
        chats never written to first, none of browser `keep`."""
        raise NotImplementedError

    # rows: (chat, browser); subclasses implement these
    def _get(self, browser: str, chat_id: str) -> Chat | None: raise NotImplementedError
    def _put(self, browser: str, chat: Chat, data: str) -> None: raise NotImplementedError
    def _delete(self, browser: str, chat_id: str) -> None: raise NotImplementedError
    def _list(self, browser: str) -> list[tuple[Chat, int]]: raise NotImplementedError  # newest first
    def _sizes(self, browser: str) -> list[tuple[str, int]]: raise NotImplementedError  # (id, bytes), oldest first
    def _expire(self, before: float) -> int: raise NotImplementedError

    def get(self, browser: str, chat_id: str | None) -> Chat | None:
        if not chat_id:
            return None
        with self._lock:
            return self._get(browser, chat_id)

    def chats(self, browser: str) -> list[Chat]:
        """This browser's chats, most recently used first (messages included)."""
        with self._lock:
            return [c for c, _ in self._list(browser)]

    def save(self, browser: str, chat: Chat) -> str:
        """Store the chat; returns a notice when older chats had to go to stay within the cap.
        ChatTooLarge when the chat alone is over the browser's limit (nothing is written)."""
        with self._transaction():
            return self._save(browser, chat)

    def _save(self, browser: str, chat: Chat) -> str:
        self._maybe_expire()
        chat.updated = time.time()
        data = json.dumps(asdict(chat), ensure_ascii=False)
        size = len(data.encode())
        if size > self.max_bytes:
            raise ChatTooLarge(f"This chat is {size / 2**20:.1f} MB, over the limit of {self.max_bytes / 2**20:g} MB "
                               "a browser keeps: start a new chat (export this one first to keep it).")
        self._put(browser, chat, data)
        sizes = self._sizes(browser)  # sizes only: no chat is read back to count them
        total, removed = sum(size for _, size in sizes), 0
        for chat_id, size in sizes:  # oldest first, never the one just saved
            if total <= self.max_bytes and len(sizes) - removed <= self.max_chats:
                break
            if chat_id == chat.id:
                continue
            self._delete(browser, chat_id)
            total, removed = total - size, removed + 1
        self._within_total(browser)
        if removed:
            return (f"{removed} older chat{'s' if removed > 1 else ''} removed to stay within this "
                    f"browser's limit of {self.max_bytes / 2**20:g} MB / {self.max_chats} chats.")
        return ""

    def _within_total(self, browser: str) -> None:
        """Past the store's total, the least recently used chats of idle browsers go (chats never
        written to first): any visitor can fill a browser's share, not the disk."""
        if self._total() <= self.max_total:
            return
        for before in (time.time() - IDLE_BROWSER_S, time.time()):  # idle browsers first, then anyone else's
            while self._total() > self.max_total:
                victims = self._oldest_idle(before, browser, 100)
                if not victims:
                    break
                for b, cid in victims:
                    self._delete(b, cid)

    def update(self, browser: str, chat_id: str, change: Any) -> tuple[Chat | None, str]:
        """Read, change (change(chat) edits it in place) and save, as one step: two handlers
        writing one chat never lose each other's change, in this process or another one on the
        same file. Returns (chat, notice)."""
        with self._transaction():
            chat = self._get(browser, chat_id)
            if chat is None:
                return None, ""
            change(chat)
            return chat, self._save(browser, chat)

    def delete(self, browser: str, chat_id: str) -> None:
        with self._transaction():
            self._delete(browser, chat_id)

    def _maybe_expire(self) -> None:
        if time.time() - self._expired_at > EXPIRE_EVERY_S:
            self._expired_at = time.time()
            self._expire_now()

    def expire(self) -> int:
        """Forget chats not used for the retention period (and chats never written to after a
        day); returns how many went. Runs at start-up and every EXPIRE_EVERY_S while saving."""
        with self._transaction():
            self._expired_at = time.time()
            return self._expire_now()

    def _expire_now(self) -> int:
        now = time.time()
        gone = self._expire_empty(now - EMPTY_CHAT_DAYS * 86400)
        if self.retention_s > 0:
            gone += self._expire(now - self.retention_s)
        return gone

    def _expire_empty(self, before: float) -> int:
        raise NotImplementedError

    def all_chats(self) -> Iterator[tuple[str, Chat]]:  # for the owner's export of liked replies
        raise NotImplementedError


class MemoryStore(Store):
    """For --no-history: chats live as long as the process, nothing is written to disk."""

    def __init__(self, **kw: Any):
        super().__init__(**kw)
        self._rows: dict[str, dict[str, str]] = {}  # browser -> chat id -> JSON

    def _get(self, browser: str, chat_id: str) -> Chat | None:
        raw = self._rows.get(browser, {}).get(chat_id)
        return Chat(**json.loads(raw)) if raw else None

    def _put(self, browser: str, chat: Chat, data: str) -> None:
        self._rows.setdefault(browser, {})[chat.id] = data

    def _total(self) -> int:
        return sum(len(raw.encode()) for chats in self._rows.values() for raw in chats.values())

    def _oldest_idle(self, before: float, keep: str, limit: int) -> list[tuple[str, str]]:
        rows = [(not json.loads(raw)["messages"], json.loads(raw)["updated"], b, cid)
                for b, chats in self._rows.items() if b != keep for cid, raw in chats.items()]
        rows = [r for r in rows if r[1] < before]
        rows.sort(key=lambda r: (not r[0], r[1]))
        return [(b, cid) for _, _, b, cid in rows[:limit]]

    def _expire_empty(self, before: float) -> int:
        gone = 0
        for chats in self._rows.values():
            for cid in [cid for cid, raw in chats.items()
                        if not json.loads(raw)["messages"] and json.loads(raw)["updated"] < before]:
                del chats[cid]
                gone += 1
        return gone

    def _delete(self, browser: str, chat_id: str) -> None:
        self._rows.get(browser, {}).pop(chat_id, None)

    def _list(self, browser: str) -> list[tuple[Chat, int]]:
        rows = [(Chat(**json.loads(raw)), len(raw.encode())) for raw in self._rows.get(browser, {}).values()]
        return sorted(rows, key=lambda r: r[0].updated, reverse=True)

    def _sizes(self, browser: str) -> list[tuple[str, int]]:
        return [(c.id, size) for c, size in reversed(self._list(browser))]

    def _expire(self, before: float) -> int:
        gone = 0
        for chats in self._rows.values():
            for cid in [cid for cid, raw in chats.items() if json.loads(raw)["updated"] < before]:
                del chats[cid]
                gone += 1
        return gone

    def all_chats(self) -> Iterator[tuple[str, Chat]]:
        with self._lock:
            items = [(b, Chat(**json.loads(raw))) for b, chats in self._rows.items() for raw in chats.values()]
        yield from items


class SQLiteStore(Store):
    """Chats in one SQLite file (WAL: readers never wait for the writer)."""

    def __init__(self, path: str | Path, **kw: Any):
        super().__init__(**kw)
        self.path = Path(path).expanduser()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"{self.path}: cannot be used as the chat store: {exc}") from exc
        self._depth = 0  # transactions open (nested ones join the outer)
        self._set_up(SETUP_WAIT_S)

    def _set_up(self, wait_s: float) -> None:
        """WAL mode and the tables. App replicas started together on one new file race for the
        switch to WAL, and SQLite answers the loser "database is locked" at once (its busy
        timeout is not applied to that lock): try again until the winner is done."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
                self._db.execute("CREATE TABLE IF NOT EXISTS chats (browser TEXT NOT NULL, id TEXT NOT NULL, "
                                 "updated REAL NOT NULL, data TEXT NOT NULL, PRIMARY KEY (browser, id))")
                self._db.execute("CREATE INDEX IF NOT EXISTS chats_updated ON chats (updated)")
                self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
                return
            except sqlite3.Error as exc:  # not a database, read-only, locked
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise StoreError(f"{self.path}: cannot be used as the chat store: {exc}") from exc
                if time.monotonic() > deadline:
                    raise StoreError(f"{self.path}: the chat store is locked by another process "
                                     f"(still after {wait_s:.0f} s)") from exc
                time.sleep(random.uniform(0.02, 0.1))  # apart, not in step

    def secret(self) -> str:
        """A value kept with the chats across restarts (the page encrypts its browser id with it)."""
        with self._lock:  # app replicas on one file agree on it: the first to write it wins
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('browser_secret', ?)", (secrets.token_urlsafe(24),))
            return self._db.execute("SELECT value FROM meta WHERE key='browser_secret'").fetchone()[0]

    def _get(self, browser: str, chat_id: str) -> Chat | None:
        row = self._db.execute("SELECT data FROM chats WHERE browser=? AND id=?", (browser, chat_id)).fetchone()
        return Chat(**json.loads(row[0])) if row else None

    @contextlib.contextmanager
    def _transaction(self):
        """BEGIN IMMEDIATE: the write lock of the file is taken before the read, so a
        read-modify-write in one process never overwrites another process's change (two app
        workers on one chat kept 520 of 1,000 updates without it). Nested use joins the outer one.
        A failed write is a StoreWriteError in words; nothing of it stays."""
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise _write_error(exc) from None
            self._depth = 1
            try:
                yield
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                raise _write_error(exc) from None
            except BaseException:
                self._rollback()
                raise
            finally:
                self._depth = 0

    def _rollback(self) -> None:
        try:
            self._db.execute("ROLLBACK")
        except sqlite3.Error:
            pass

    def _put(self, browser: str, chat: Chat, data: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO chats VALUES (?, ?, ?, ?)", (browser, chat.id, chat.updated, data))

    def _total(self) -> int:
        """Bytes in use in the file (its pages less the free ones): O(1), unlike summing rows."""
        pages = self._db.execute("PRAGMA page_count").fetchone()[0] - self._db.execute("PRAGMA freelist_count").fetchone()[0]
        return pages * self._db.execute("PRAGMA page_size").fetchone()[0]

    def _oldest_idle(self, before: float, keep: str, limit: int) -> list[tuple[str, str]]:
        return self._db.execute(
            "SELECT browser, id FROM chats WHERE browser != ? AND updated < ? "
            "ORDER BY (json_array_length(json_extract(data, '$.messages')) > 0), updated LIMIT ?",
            (keep, before, limit)).fetchall()

    def _expire_empty(self, before: float) -> int:
        return self._db.execute("DELETE FROM chats WHERE updated < ? AND json_array_length(json_extract(data, "
                                "'$.messages')) = 0", (before,)).rowcount

    def _delete(self, browser: str, chat_id: str) -> None:
        self._db.execute("DELETE FROM chats WHERE browser=? AND id=?", (browser, chat_id))

    def _list(self, browser: str) -> list[tuple[Chat, int]]:
        rows = self._db.execute("SELECT data, length(CAST(data AS BLOB)) FROM chats WHERE browser=? "
                                "ORDER BY updated DESC", (browser,)).fetchall()
        return [(Chat(**json.loads(data)), size) for data, size in rows]

    def _sizes(self, browser: str) -> list[tuple[str, int]]:
        return self._db.execute("SELECT id, length(CAST(data AS BLOB)) FROM chats WHERE browser=? "
                                "ORDER BY updated", (browser,)).fetchall()

    def _expire(self, before: float) -> int:
        return self._db.execute("DELETE FROM chats WHERE updated < ?", (before,)).rowcount

    def all_chats(self) -> Iterator[tuple[str, Chat]]:
        with self._lock:
            rows = self._db.execute("SELECT browser, data FROM chats ORDER BY updated").fetchall()
        for browser, data in rows:
            yield browser, Chat(**json.loads(data))

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _write_error(exc: sqlite3.Error) -> StoreWriteError:
    text = str(exc).lower()
    if "full" in text:
        return StoreWriteError("The chats could not be saved: the server's disk is full. Please try again later.")
    if "readonly" in text or "read-only" in text:
        return StoreWriteError("The chats could not be saved: the chat store is read-only.")
    if "locked" in text or "busy" in text:
        return StoreWriteError("The chats could not be saved: the chat store is busy. Please try again.")
    return StoreWriteError(f"The chats could not be saved ({exc}). Please try again later.")


# -- formats -----------------------------------------------------------------------------------

def training_turns(chat: Chat, liked_only: bool = False) -> tuple[list[dict], list[str | None]]:
    """The chat as a training sample (`messages` as training.data.validate reads them: system
    first, then user and assistant taking turns, ending with an answer) and each answer's rating.
    Error notices and questions that got no answer are left out; a 👎 reply is never a target:
    the sample starts after the last disliked exchange before its end; with liked_only it ends at
    the last liked reply. ([], []) when nothing is left."""
    turns: list[dict] = []
    ratings: list[str | None] = []
    for m in chat.messages:
        if m.get("error") or m.get("role") not in ("user", "assistant") or not m.get("content", "").strip():
            continue
        if m["role"] == "user":
            if turns and turns[-1]["role"] == "user":
                turns.pop()  # a question that got no answer
            turns.append({"role": "user", "content": m["content"]})
        elif turns and turns[-1]["role"] == "user":
            turns.append({"role": "assistant", "content": m["content"]})
            ratings.append(m.get("feedback"))
    if turns and turns[-1]["role"] == "user":
        turns.pop()
    answers = [i for i, t in enumerate(turns) if t["role"] == "assistant"]  # index of each rated answer
    if liked_only:
        liked = [k for k, r in enumerate(ratings) if r == "like"]
        if not liked:
            return [], []
        turns, ratings, answers = turns[:answers[liked[-1]] + 1], ratings[:liked[-1] + 1], answers[:liked[-1] + 1]
    disliked = [k for k, r in enumerate(ratings) if r == "dislike"]
    if disliked:  # what a 👎 reply answered, and it, are context at most: start after them
        cut = answers[disliked[-1]] + 1
        turns, ratings = turns[cut:], ratings[disliked[-1] + 1:]
    if not turns:
        return [], []
    system = [{"role": "system", "content": chat.system}] if chat.system.strip() else []
    return system + turns, ratings


def training_messages(chat: Chat, liked_only: bool = False) -> list[dict] | None:
    """`training_turns`' sample alone; None when nothing is left."""
    return training_turns(chat, liked_only)[0] or None


def training_record(chat: Chat, liked_only: bool = False) -> dict | None:
    """One line of training JSONL for the chat: its sample, and the ratings of its answers in
    order ("like", "dislike" or null: what the visitor said of each), beside it."""
    sample, ratings = training_turns(chat, liked_only)
    return {"messages": sample, "ratings": ratings} if sample else None


def markdown(chat: Chat) -> str:
    out = [f"# {chat.title}", ""]
    if chat.system.strip():
        out += [f"*System prompt:* {chat.system}", ""]
    for m in chat.messages:
        who = "You" if m["role"] == "user" else ("Notice" if m.get("error") else "Assistant")
        out += [f"**{who}:**", "", m.get("content", ""), ""]
    return "\n".join(out)


def chat_from_json(text: str) -> Chat:
    """A chat from exported JSON: {"messages": [...]} (the training format, with or without our
    title/settings) or a bare list of messages. Raises ValueError naming what is wrong."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if isinstance(data, list):
        data = {"messages": data}
    if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
        raise ValueError('expected {"messages": [{"role": ..., "content": ...}, ...]}')
    system, messages = "", []
    ratings = data.get("ratings") if isinstance(data.get("ratings"), list) else []
    for i, m in enumerate(data["messages"]):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}]: needs a role (system, user, assistant) and text content")
        if m["role"] == "system":
            system = m["content"]
        else:
            messages.append({"role": m["role"], "content": m["content"]})
    for m, rating in zip((m for m in messages if m["role"] == "assistant"), ratings):  # an export's ratings
        if rating in ("like", "dislike"):
            m["feedback"] = rating
    if not messages:
        raise ValueError("no user or assistant messages")
    title = data.get("title")[:80] if isinstance(data.get("title"), str) else messages[0]["content"][:40]
    settings = data.get("settings") if isinstance(data.get("settings"), dict) else {}
    return new_chat(title=title or "Imported chat", system=system, settings=settings, messages=messages)


def export_json(chat: Chat) -> str:
    """The chat as one line of training JSONL (the training tools read it as it is; the page
    imports it back): its sample and ratings, its title and settings beside them."""
    sample, ratings = training_turns(chat)
    if not sample:
        sample = [{"role": "system", "content": chat.system}] if chat.system else []
    return json.dumps({"messages": sample, "ratings": ratings, "title": chat.title, "settings": chat.settings},
                      ensure_ascii=False) + "\n"


def export_all_json(chats: list[Chat]) -> str:
    """Every chat with an answer, one training JSONL line each (the page's "all chats" export)."""
    return "".join(export_json(c) for c in chats if training_turns(c)[0])
