"""The page as a demanding new visitor uses it (issue 21's walk), in headless Chromium: refused
actions leave the chat as it was, the busy state after Retry and Continue, a megabyte paste,
Compare's own bins and Stop, exports the training tools read, the keyboard, contrast and touch
targets, deleting with undo, the app dying mid-reply, and the small things. The engine is the
synthetic one; every check waits for an observable state."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from chat_ui.settings import AppSettings
from chat_ui.store import SQLiteStore
from chat_ui.ui import ChatUI, launch
from conftest import ROOT, open_page
from engines import Recorder, synthetic
from infer_engine.server import free_port
from test_chat_page import (ARTIFACTS, REPLY_TOKENS, bots, eventually, open_side_panel, send, settled, streaming,
                            users)

pytestmark = pytest.mark.slow


class Asked(Recorder):
    """Notes the messages each session's last request sent to the model."""

    def __init__(self, inner):
        super().__init__(inner)
        self.asked: dict[str, list[dict]] = {}

    def _stream(self, gen):
        self.asked[gen.session_id] = [dict(m) for m in gen.messages]
        yield from super()._stream(gen)


class WalkApp:
    def __init__(self, tmp_path):
        self.port, self.db = free_port(), tmp_path / "chats.sqlite3"
        self.engine = Asked(synthetic(tokens_per_s=60, reply_tokens=REPLY_TOKENS, name="tiny-chat"))
        self.base = Asked(synthetic(tokens_per_s=60, reply_tokens=REPLY_TOKENS, name="base"))
        settings = AppSettings(host="127.0.0.1", port=self.port, history_path=str(self.db), title="Tiny chat",
                               max_input_chars=300, examples="tell me a story")
        self.ui = ChatUI(self.engine, settings, compare=self.base)
        self.demo = self.ui.build()
        launch(self.demo, settings, prevent_thread_lock=True)
        self.url = f"http://127.0.0.1:{self.port}/"

    def idle(self, timeout: float = 30):
        deadline = time.time() + timeout
        q = self.demo._queue
        while time.time() < deadline:
            if not self.engine.running_sessions() and not self.base.running_sessions() \
                    and not self.ui.service.busy() and all(j is None for j in q.active_jobs) and not len(q):
                return
            time.sleep(0.02)
        raise AssertionError("the app did not come to rest")


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    a = WalkApp(tmp_path_factory.mktemp("walk"))
    yield a
    a.demo.close()


@pytest.fixture
def page(browser, app):
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = ctx.new_page()
    open_page(pg, app.url)
    yield pg
    ctx.close()


def shown(page) -> tuple[int, int]:
    return len(users(page)), len(bots(page))


def stats(page) -> str:
    return page.locator("#stats").inner_text()


def visible(page, selector: str) -> bool:
    return page.evaluate(f"() => {{ const e = document.querySelector('{selector}'); "
                         "return !!(e && e.offsetParent !== null); }")


def type_raw(page, text: str) -> None:
    """Put text into the message box as a paste would (lone surrogates and megabytes included)."""
    page.evaluate("""(t) => { const box = document.querySelector('#input textarea'); box.value = t;
                     box.dispatchEvent(new Event('input', {bubbles: true})); }""", text)


# 1. a refused action leaves the visible chat as it is, with the reason shown

def test_a_refused_action_keeps_the_chat_on_screen_with_the_reason(page, app, browser):
    send(page, "the first question")
    settled(page, app)
    before = shown(page)
    page.locator("#input textarea").fill("")
    page.locator("#input textarea").press("Enter")  # nothing to send: nothing changes
    app.idle()
    assert shown(page) == before and "tokens" in stats(page)
    for text, reason in (("x" * 400, "the limit is 300"), ("bad \ud800 text", "not valid text")):
        type_raw(page, text)
        page.locator("#input textarea").press("Enter")
        page.wait_for_function(f"() => document.querySelector('#stats').innerText.includes({json.dumps(reason)})")
        assert shown(page)[0] == before[0]  # the question was not taken; the chat is still there
        assert page.locator("#chatbot").inner_text().count("the first question") >= 1
    # a second tab sends while the first streams: refused there, both chats still shown
    other = page.context.new_page()
    open_page(other, app.url)
    send(page, "a long answer please")
    streaming(page)
    other.locator("#input textarea").fill("from the second tab")
    other.locator("#input textarea").press("Enter")
    other.wait_for_function("() => document.querySelector('#stats').innerText.includes('still being written')")
    assert "the first question" in other.locator("#chatbot").inner_text()
    settled(page, app)
    other.screenshot(path=str(ARTIFACTS / "walk-1-refused.png"))
    other.close()
    # Continue after an error notice: refused, the chat stays
    type_raw(page, "y" * 400)
    page.locator("#input textarea").press("Enter")
    page.wait_for_function("() => document.querySelector('#stats').innerText.includes('the limit is 300')")
    count = shown(page)
    page.locator("#continue").click()
    page.wait_for_function("() => /Not sent|nothing to continue/.test(document.querySelector('#stats').innerText)")
    assert shown(page)[0] == count[0] and "a long answer please" in page.locator("#chatbot").inner_text()


# 2. Retry or Continue during a reply: the new reply streams with Stop showing

def test_retry_and_continue_during_a_reply_stream_with_stop_showing(page, app):
    send(page, "retry me")
    streaming(page)
    page.locator("#retry").click()
    streaming(page, min_words=4)
    assert visible(page, "#stop") and not visible(page, "#send")
    page.locator("#stop").click()
    settled(page, app)
    page.locator("#continue").click()
    streaming(page, min_words=20)
    page.locator("#continue").click()  # again, while it streams
    streaming(page, min_words=24)
    assert visible(page, "#stop") and not visible(page, "#send")
    page.screenshot(path=str(ARTIFACTS / "walk-2-continue-during.png"))
    settled(page, app)


# 3. a paste of over 1 MB gets the same length warning as one character too many

def test_a_megabyte_paste_gets_the_length_warning_not_error_badges(page, app):
    type_raw(page, "z" * 1_100_000)
    page.locator("#input textarea").press("Enter")
    page.wait_for_function("() => document.querySelector('#stats').innerText.includes('1,100,000 characters')")
    assert "the limit is 300" in stats(page)
    assert page.locator(".error:visible").count() == 0  # no bare red "Error" badge anywhere
    assert len(page.locator("#input textarea").input_value()) == 1_100_000  # the text stays in the box
    page.screenshot(path=str(ARTIFACTS / "walk-3-megabyte.png"))


# 4. Compare: a side's own bin forgets that side's history; Stop says so on both

def test_compare_side_bin_clears_its_history_and_stop_settles_both_stats(page, app):
    page.get_by_role("tab", name="Compare").click()
    box = page.locator("#cmp_input textarea")
    box.fill("first compare question")
    box.press("Enter")
    app.idle()
    page.wait_for_function("() => ['#chat_a', '#chat_b'].every(id => [...document.querySelectorAll(id + "
                           "' [data-testid=\"bot\"]')].some(b => b.innerText.includes('w120')))")
    page.locator("#chat_a").get_by_label("Clear").click()
    page.wait_for_function("() => !document.querySelector('#chat_a [data-testid=\"user\"]')")
    box.fill("second compare question")
    box.press("Enter")
    page.wait_for_function("() => [...document.querySelectorAll('#chat_b [data-testid=\"bot\"]')].pop()"
                           ".innerText.split(/\\s+/).length >= 8")
    page.locator("#cmp_stop").click()
    app.idle()
    a = next(v for k, v in app.engine.asked.items() if k.endswith("compare-a"))
    b = next(v for k, v in app.base.asked.items() if k.endswith("compare-b"))
    assert [m["content"] for m in a if m["role"] == "user"] == ["second compare question"]
    assert [m["content"] for m in b if m["role"] == "user"] == ["first compare question", "second compare question"]
    for sel in ("#stats_a", "#stats_b"):
        text = eventually(lambda sel=sel: page.locator(sel).inner_text(), "Stopped.")
        assert text != "…" and "Continue" not in text
    page.screenshot(path=str(ARTIFACTS / "walk-4-compare.png"))


# 6. the keyboard

def test_the_keyboard_reaches_what_shows_and_nothing_hidden(page, app):
    send(page, "keys please")
    settled(page, app)
    inside = []
    for _ in range(40):  # the side panel is closed: Tab never lands in it
        page.keyboard.press("Tab")
        inside.append(page.evaluate("() => !!document.activeElement.closest('.sidebar-content')"))
    assert not any(inside)
    labels = page.evaluate("() => [...document.querySelectorAll('#chatbot button')].filter(b => b.tabIndex >= 0)"
                           ".map(b => b.getAttribute('aria-label'))")
    assert {"Like", "Dislike", "Edit", "Copy message"} <= set(labels)
    send(page, "stop me with the keyboard")
    streaming(page)
    page.locator("#stop").focus()
    page.keyboard.press("Enter")  # Enter on Stop: the focus goes back to the message box
    page.wait_for_function("() => document.activeElement === document.querySelector('#input textarea')")
    settled(page, app)
    send(page, "escape stops it")
    streaming(page)
    page.keyboard.press("Escape")
    page.locator("#send").wait_for(state="visible")
    assert "Stopped" in eventually(lambda: stats(page), "Stopped.")


# 7. contrast and touch targets

CONTRAST = """(el, pseudo) => {
  const rgb = s => (s.match(/[\\d.]+/g) || []).map(Number);
  const lum = ([r, g, b]) => { const f = c => { c /= 255; return c <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4; };
    return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b); };
  let bg = null, e = el;
  while (e) { const c = rgb(getComputedStyle(e).backgroundColor); if (c.length >= 3 && (c.length < 4 || c[3] > 0.5)) { bg = c; break; }
    e = e.parentElement; }
  bg = bg || [255, 255, 255];
  const fg = rgb(getComputedStyle(el, pseudo || null).color);
  const [a, b] = [lum(fg), lum(bg)].sort((x, y) => y - x);
  return (a + 0.05) / (b + 0.05); }"""


def test_text_contrast_and_phone_touch_targets(browser, app, page):
    tab = page.locator('button[role="tab"].selected')
    assert tab.evaluate(CONTRAST) >= 4.5
    footer = page.locator("footer button, footer a").first
    assert footer.evaluate(CONTRAST) >= 4.5
    open_side_panel(page)
    rename = page.locator("#rename_box input, #rename_box textarea").first
    assert rename.evaluate(CONTRAST, "::placeholder") >= 4.5
    box = page.locator("#input textarea")
    box.focus()
    ring = box.evaluate("""e => { const c = getComputedStyle(e).borderColor; return c; }""")
    assert box.evaluate(CONTRAST.replace("getComputedStyle(el, pseudo || null).color",
                                         "getComputedStyle(el).borderColor")) >= 3.0, ring
    label = page.locator('#chatbot label[data-testid="block-label"]')
    assert float(label.evaluate("e => parseFloat(getComputedStyle(e).fontSize)")) >= 14
    assert label.evaluate(CONTRAST) >= 4.5
    ctx = browser.new_context(viewport={"width": 390, "height": 844})
    phone = ctx.new_page()
    open_page(phone, app.url)
    send(phone, "small screen")
    settled(phone, app)
    for sel in ("#retry", "#continue", "#undo", "#clear"):
        assert phone.locator(sel).bounding_box()["height"] >= 44
    phone.locator('#chatbot [data-testid="bot"]').last.hover()
    for b in phone.locator('#chatbot .message-buttons button').all():
        if b.is_visible():
            box = b.bounding_box()
            assert box["width"] >= 24 and box["height"] >= 24
    ctx.close()


# 8. delete: undo brings it back

def test_a_deleted_chat_can_be_brought_back(page, app):
    send(page, "do not lose me")
    settled(page, app)
    open_side_panel(page)
    page.locator("#delete_chat").click()
    page.locator("#undo_delete").wait_for(state="visible")
    page.wait_for_function("() => !document.querySelector('#chatbot').innerText.includes('do not lose me')")
    page.locator("#undo_delete").click()
    page.wait_for_function("() => document.querySelector('#chatbot').innerText.includes('do not lose me')")
    page.locator("#undo_delete").wait_for(state="hidden")
    assert "do not lose me" in page.locator("#chat_list").inner_text()


# 10. the small things

def test_continue_on_a_finished_reply_says_why_and_notices_have_nothing_to_rate(page, app):
    send(page, "a whole reply")
    settled(page, app)
    page.locator("#continue").click()
    page.wait_for_function("() => document.querySelector('#stats').innerText.includes('nothing to continue')")
    assert "0 tokens" not in stats(page)
    type_raw(page, "w" * 400)  # an error notice in the chat window
    page.locator("#input textarea").press("Enter")
    page.wait_for_function("() => document.querySelector('#stats').innerText.includes('the limit is')")
    page.wait_for_function("""() => { const rows = [...document.querySelectorAll('#chatbot .message-row')];
        const last = rows[rows.length - 1]; const like = last && last.querySelector('button[aria-label="Like"]');
        return !like || like.offsetParent === null; }""")


# 9. the app dies mid-reply: what came stays, marked cut; the next turn is well formed

def test_the_app_dying_mid_reply_keeps_what_came_and_the_next_turn_is_well_formed(browser, tmp_path):
    port, db = free_port(), tmp_path / "chats.sqlite3"

    ctx = browser.new_context(viewport={"width": 1280, "height": 900})  # one browser: its chats, its id

    def start():
        proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--backend", "synthetic", "--host", "127.0.0.1",
                                 "--port", str(port), "--history-path", str(db), "--synthetic-tokens-per-s", "20",
                                 "--synthetic-reply-tokens", "400", "--workers", "1"],
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        pg = ctx.new_page()
        deadline = time.time() + 120
        while True:
            try:
                open_page(pg, f"http://127.0.0.1:{port}/")
                return proc, pg
            except Exception:
                if time.time() > deadline:
                    raise
                time.sleep(0.5)

    proc, pg = start()
    send(pg, "a reply that will be cut")
    streaming(pg, min_words=60)  # 3 s at 20 tokens/s: saved as it goes (every 2 s)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    pg.locator("#send").wait_for(state="visible")  # Send is back without the server
    assert "Cut off" in pg.locator("#chatbot").inner_text() and "Cut off" in stats(pg)
    words_seen = len(bots(pg)[-1].split())
    pg.screenshot(path=str(ARTIFACTS / "walk-9-cut.png"))
    pg.close()
    proc, pg = start()
    try:
        pg.wait_for_function("() => document.querySelector('#chatbot').innerText.includes('Cut off')")
        kept = bots(pg)[-1]
        assert kept.startswith("You said: a reply that will be cut") and len(kept.split()) >= 40
        assert len(kept.split()) <= words_seen + 10
        send(pg, "and now?")
        pg.locator('#chatbot [data-testid="bot"]').filter(has_text="You said: and now?").wait_for()
        pg.locator("#stop").click()
        pg.locator("#send").wait_for(state="visible")
        pg.screenshot(path=str(ARTIFACTS / "walk-9-after-restart.png"))
    finally:
        ctx.close()
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    store = SQLiteStore(db)
    (chat,) = [c for _, c in store.all_chats()]
    store.close()
    roles = [m["role"] for m in chat.messages if not m.get("error")]
    assert roles == ["user", "assistant", "user", "assistant"]  # never two questions in a row
    assert chat.messages[1].get("finish") == "cut"
