"""The conversation store: per-browser isolation, the size cap, retention, the formats the
training tools read, and import of what was exported."""
from __future__ import annotations

import json
import time

import pytest

from chat_ui.store import (MemoryStore, SQLiteStore, chat_from_json, export_json, markdown, new_browser_id,
                           new_chat, training_messages, valid_browser_id)


@pytest.fixture(params=["sqlite", "memory"])
def store(request, tmp_path):
    if request.param == "sqlite":
        s = SQLiteStore(tmp_path / "chats.sqlite3", max_bytes_per_browser=4000, max_chats_per_browser=5)
        yield s
        s.close()
    else:
        yield MemoryStore(max_bytes_per_browser=4000, max_chats_per_browser=5)


def test_a_browser_sees_only_its_own_chats(store):
    a, b = new_browser_id(), new_browser_id()
    chat = new_chat(title="mine", messages=[{"role": "user", "content": "secret"}])
    store.save(a, chat)
    assert [c.title for c in store.chats(a)] == ["mine"]
    assert store.chats(b) == [] and store.get(b, chat.id) is None  # knowing the chat id is not enough
    store.delete(b, chat.id)
    assert store.get(a, chat.id) is not None


def test_browser_ids_are_unguessable_tokens():
    ids = {new_browser_id() for _ in range(100)}
    assert len(ids) == 100 and all(valid_browser_id(i) and len(i) >= 40 for i in ids)
    assert not valid_browser_id("127.0.0.1") and not valid_browser_id("") and not valid_browser_id(None)


def test_the_size_cap_drops_the_oldest_chats_and_says_so(store):
    b = new_browser_id()
    for i in range(5):
        store.save(b, new_chat(title=f"c{i}", messages=[{"role": "user", "content": "x" * 500}]))
        time.sleep(0.01)
    notice = store.save(b, new_chat(title="big", messages=[{"role": "user", "content": "y" * 1500}]))
    titles = [c.title for c in store.chats(b)]
    assert titles[0] == "big" and "c0" not in titles and "older chat" in notice
    assert sum(c.size() for c in store.chats(b)) <= 4000 + 200  # JSON framing differs a little


def test_old_chats_expire(tmp_path):
    s = SQLiteStore(tmp_path / "c.sqlite3", retention_days=1)
    b = new_browser_id()
    old, new = new_chat(title="old"), new_chat(title="new")
    s.save(b, old)
    s.save(b, new)
    s._db.execute("UPDATE chats SET updated = ? WHERE id = ?", (time.time() - 2 * 86400, old.id))
    assert s.expire() == 1 and [c.title for c in s.chats(b)] == ["new"]


def test_chats_survive_reopening_the_file(tmp_path):
    path, b = tmp_path / "c.sqlite3", new_browser_id()
    s = SQLiteStore(path)
    secret = s.secret()
    s.save(b, new_chat(title="kept", messages=[{"role": "user", "content": "hi"}]))
    s.close()
    s = SQLiteStore(path)
    assert [c.title for c in s.chats(b)] == ["kept"] and s.secret() == secret
    assert s._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def chat_with(*messages, system=""):
    return new_chat(system=system, messages=[dict(m) for m in messages])


U, A = {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}


def test_training_samples_alternate_and_end_with_an_answer():
    chat = chat_with(U, {"role": "assistant", "content": "failed", "error": True}, {"role": "user", "content": "q2"},
                     {"role": "assistant", "content": "a2", "feedback": "like"}, {"role": "user", "content": "q3"},
                     system="be brief")
    assert training_messages(chat) == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q2"},
                                       {"role": "assistant", "content": "a2"}]
    assert training_messages(chat, liked_only=True) == training_messages(chat)
    assert training_messages(chat_with(U, A)) == [U, A]
    assert training_messages(chat_with(U, A), liked_only=True) is None  # nothing liked
    assert training_messages(chat_with(U)) is None


def test_export_then_import_gives_the_same_chat():
    chat = chat_with(U, A, system="sys")
    chat.title, chat.settings = "T", {"temperature": 0.3}
    back = chat_from_json(export_json(chat))
    assert (back.title, back.system, back.settings, back.messages) == ("T", "sys", {"temperature": 0.3}, [U, A])
    assert "**You:**" in markdown(chat) and "*System prompt:* sys" in markdown(chat)


@pytest.mark.parametrize("text,match", [
    ("{", "not JSON"), ('{"x": 1}', "expected"), ('{"messages": [{"role": "bot", "content": "x"}]}', r"messages\[0\]"),
    ('{"messages": [{"role": "system", "content": "s"}]}', "no user or assistant"),
])
def test_import_refuses_what_is_not_a_chat(text, match):
    with pytest.raises(ValueError, match=match):
        chat_from_json(text)


def test_bare_message_lists_import_too():
    assert chat_from_json(json.dumps([U, A])).messages == [U, A]


OPEN_TOGETHER = """
import sys, time
sys.path.insert(0, {root!r})
from chat_ui.store import SQLiteStore
for r in range({rounds}):  # all processes keep one clock: round r starts at start + r * step
    time.sleep(max(0.0, {start} + r * {step} - time.time()))
    print(SQLiteStore(f"{folder}/chats{{r}}.sqlite3").secret(), flush=True)
"""


def test_app_replicas_opening_one_new_store_together_all_start_and_agree(tmp_path):
    """Processes opening one new file at the same moment (app replicas started together), many
    times over: each open succeeds, none meets "database is locked" (SQLite answers the loser of
    the switch to WAL at once, without its busy timeout), and on each file all read one secret."""
    import subprocess
    import sys

    from conftest import ROOT

    rounds, procs = 60, 6
    code = OPEN_TOGETHER.format(root=str(ROOT), rounds=rounds, start=time.time() + 5, step=0.08, folder=str(tmp_path))
    ps = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
          for _ in range(procs)]
    results = [p.communicate(timeout=300) for p in ps]
    assert all(p.returncode == 0 for p in ps), [err.strip().splitlines()[-1] for _, err in results if err.strip()]
    secrets_per_file = list(zip(*[out.split() for out, _ in results]))
    assert len(secrets_per_file) == rounds and all(len(set(s)) == 1 for s in secrets_per_file)


def test_a_store_path_that_cannot_be_used_is_one_line_naming_it(tmp_path):
    from chat_ui.store import StoreError

    (tmp_path / "a-file").write_text("")
    with pytest.raises(StoreError, match=r"a-file/chats.sqlite3: cannot be used as the chat store"):
        SQLiteStore(tmp_path / "a-file" / "chats.sqlite3")
    (tmp_path / "a-folder.sqlite3").mkdir()
    with pytest.raises(StoreError, match=r"a-folder.sqlite3: cannot be used as the chat store"):
        SQLiteStore(tmp_path / "a-folder.sqlite3")
    (tmp_path / "notes.txt").write_text("not a database, " * 100)
    with pytest.raises(StoreError, match=r"notes.txt: cannot be used as the chat store: file is not a database"):
        SQLiteStore(tmp_path / "notes.txt")


def test_a_disliked_reply_is_never_a_training_target_and_ratings_travel_with_the_sample():
    """The liked-chats export kept a 👎 reply as a target when a later reply was 👍."""
    from chat_ui.store import training_record

    q1, bad = {"role": "user", "content": "q1"}, {"role": "assistant", "content": "bad", "feedback": "dislike"}
    q2, good = {"role": "user", "content": "q2"}, {"role": "assistant", "content": "good", "feedback": "like"}
    q3, plain = {"role": "user", "content": "q3"}, {"role": "assistant", "content": "plain"}
    chat = chat_with(q1, bad, q2, good, q3, plain, system="sys")
    assert training_record(chat, liked_only=True) == {
        "messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "q2"},
                     {"role": "assistant", "content": "good"}], "ratings": ["like"]}
    rec = training_record(chat)
    assert [m["content"] for m in rec["messages"]] == ["sys", "q2", "good", "q3", "plain"]
    assert rec["ratings"] == ["like", None]
    assert training_record(chat_with(q1, bad)) is None  # nothing fit to learn from
    back = chat_from_json(export_json(chat))  # the export imports back, ratings included
    assert [m.get("feedback") for m in back.messages if m["role"] == "assistant"] == ["like", None]
