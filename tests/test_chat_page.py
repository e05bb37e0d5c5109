"""The chat page as a person uses it, in headless Chromium (Debian's) at desktop and phone size:
the controls while a reply streams, the busy state, kept conversations, feedback and export,
errors, limits, first use and contrast. The engine is the synthetic one (fixed replies at a
fixed pace), so every check waits for an observable state, never for a model's sampling."""
from __future__ import annotations

import json
import re
import subprocess
import time

import pytest

from chat_ui.settings import AppSettings
from chat_ui.ui import ChatUI, launch
from conftest import ROOT, open_page
from engines import Recorder, synthetic
from infer_engine import EngineSettings, create_engine
from infer_engine.server import free_port

pytestmark = pytest.mark.slow

ARTIFACTS = ROOT / "tests" / "artifacts"
REPLY_TOKENS = 120  # at 60 tokens/s: two seconds of streaming to press buttons in


class App:
    """The app on 127.0.0.1, restartable on the same port with the same chat store."""

    def __init__(self, tmp_path, **kw):
        self.port, self.db = free_port(), tmp_path / "chats.sqlite3"
        self.kw = kw
        self.engine = Recorder(synthetic(tokens_per_s=60, reply_tokens=REPLY_TOKENS, name="tiny-chat"))
        self.demo = None
        self.start()

    def start(self):
        settings = AppSettings(host="127.0.0.1", port=self.port, history_path=str(self.db), title="Tiny chat",
                               examples="tell me a story|What can you do?", **self.kw)
        self.ui = ChatUI(self.engine, settings, compare=synthetic(tokens_per_s=60, reply_tokens=REPLY_TOKENS,
                                                                  name="base"))
        self.demo = self.ui.build()
        launch(self.demo, settings, prevent_thread_lock=True)

    def restart(self):
        self.demo.close()
        self.ui.store.close()
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def idle(self, timeout: float = 30):
        """Quiet: no reply running in the engine or being saved, no Gradio event running, and
        every message Gradio had for a page sent."""
        q = self.demo._queue
        deadline = time.time() + timeout
        while time.time() < deadline:
            if not self.engine.running_sessions() and not self.ui.service.busy() \
                    and all(job is None for job in q.active_jobs) and not len(q) \
                    and all(m.empty() for m in list(q.pending_messages_per_session.values())):
                return
            time.sleep(0.02)
        raise AssertionError("the app did not come to rest")


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    a = App(tmp_path_factory.mktemp("page"), max_input_chars=300, system_prompt="")
    yield a
    a.demo.close()


@pytest.fixture
def page(browser, app):
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = ctx.new_page()
    open_page(pg, app.url)
    yield pg
    ctx.close()


def bots(page) -> list[str]:
    return page.locator('#chatbot [data-testid="bot"]').all_inner_texts()


def users(page) -> list[str]:
    return page.locator('#chatbot [data-testid="user"]').all_inner_texts()


def send(page, text: str, accepted: bool = True):
    """Type and press Enter; then wait until the page took the message (it shows, Stop replaces
    Send) unless accepted=False."""
    box = page.locator("#input textarea")
    box.fill(text)
    box.press("Enter")
    if accepted:
        page.locator('#chatbot [data-testid="user"]').filter(has_text=text.split()[0]).last.wait_for()
        started(page)


def started(page):
    """A reply has begun (Stop is shown), or has already ended (its text is there)."""
    page.wait_for_function("() => { const s = document.querySelector('#stop'); "
                           "return (s && s.offsetParent !== null) || document.querySelector('#chatbot "
                           "[data-testid=\"bot\"]:last-child'); }")


def streaming(page, min_words: int = 8):
    """Wait until a reply is on screen and growing, with Stop in place of Send."""
    page.locator("#stop").wait_for(state="visible")
    page.wait_for_function(f"() => {{ const b = [...document.querySelectorAll('#chatbot [data-testid=\"bot\"]')]; "
                           f"return b.length && b[b.length - 1].innerText.split(/\\s+/).length >= {min_words}; }}")


def settled(page, app):
    """The app is at rest (nothing left to send to the page) and the page is back to Send: what
    it shows now is final (a stale streamed update would be the last thing it had applied)."""
    app.idle()
    page.locator("#send").wait_for(state="visible")


def eventually(read, expected, timeout: float = 30.0):
    """What `read()` gives, once it equals `expected` (the page applies what it was sent in its
    own time); else the last reading, for the assertion to show."""
    deadline = time.time() + timeout
    while True:
        got = read()
        if got == expected or time.time() > deadline:
            return got
        time.sleep(0.05)


def full_reply(question: str) -> str:
    words = ["You", "said:", *question.split()]
    return " ".join(words + [f"w{n}" for n in range(len(words) + 1, REPLY_TOKENS + 1)])


# -- the controls, at any moment ---------------------------------------------------------------

def test_clear_while_a_reply_streams_empties_the_chat_for_good(page, app):
    send(page, "clear me")
    streaming(page)
    page.locator("#clear").click()
    settled(page, app)
    assert eventually(lambda: (users(page), bots(page)), ([], [])) == ([], [])
    page.reload()
    page.locator("#input textarea").wait_for()
    page.wait_for_timeout(300)
    assert bots(page) == [] and users(page) == []


def test_undo_while_a_reply_streams_removes_the_exchange(page, app):
    send(page, "undo me")
    streaming(page)
    page.locator("#undo").click()
    settled(page, app)
    assert eventually(lambda: (users(page), bots(page)), ([], [])) == ([], [])
    assert page.locator("#input textarea").input_value() == "undo me"  # back into the empty box
    send(page, "undo me too")
    streaming(page)
    page.locator("#input textarea").fill("a draft")
    page.locator("#undo").click()
    settled(page, app)
    got = eventually(lambda: users(page), [])
    assert got == []
    assert page.locator("#input textarea").input_value() == "a draft"  # kept


def test_retry_while_a_reply_streams_answers_again(page, app):
    send(page, "retry me")
    streaming(page)
    page.locator("#retry").click()
    page.wait_for_function("() => document.querySelector('#stats')?.innerText.trim() === '…'")
    settled(page, app)
    assert eventually(lambda: (users(page), bots(page)), (["retry me"], [full_reply("retry me")])) == \
        (["retry me"], [full_reply("retry me")])


def test_stop_keeps_the_reply_so_far_and_reads_stopped(page, app):
    send(page, "stop me")
    streaming(page)
    page.locator("#stop").click()
    settled(page, app)
    partial = bots(page)[-1]
    assert partial.startswith("You said: stop me") and partial != full_reply("stop me")
    assert "stopped" in page.locator("#stats").inner_text().lower()
    assert page.locator(".toast-body").count() == 0  # no error badges over the page
    page.locator("#continue").click()  # and Continue goes on from there
    page.locator("#stop").wait_for(state="visible")
    settled(page, app)
    assert eventually(lambda: bots(page), [full_reply("stop me")]) == [full_reply("stop me")]


def test_the_chat_windows_own_bin_clears_the_history_too(page, app):
    send(page, "first")
    settled(page, app)
    page.locator("#chatbot").get_by_label("Clear").click()
    settled(page, app)
    send(page, "second")
    settled(page, app)
    assert eventually(lambda: users(page), ["second"]) == ["second"]
    page.reload()
    page.locator('#chatbot [data-testid="user"]').first.wait_for()
    assert users(page) == ["second"]


def test_edit_a_question_and_the_answer_follows(page, app):
    send(page, "one two")
    settled(page, app)
    send(page, "three")
    settled(page, app)
    page.locator('#chatbot [data-testid="user"]').first.hover()
    page.locator("#chatbot").get_by_label("Edit").first.click()
    editor = page.locator("#chatbot textarea").first
    editor.fill("five six")
    page.locator("#chatbot").get_by_role("button", name="Submit").click()
    page.locator('#chatbot [data-testid="user"]').filter(has_text="five six").wait_for()
    settled(page, app)
    assert eventually(lambda: (users(page), bots(page)), (["five six"], [full_reply("five six")])) == \
        (["five six"], [full_reply("five six")])


def test_a_second_enter_while_streaming_sends_nothing_twice(page, app):
    send(page, "only once")
    streaming(page)
    send(page, "not now", accepted=False)
    page.locator(".toast-body").filter(has_text="still being written").wait_for()
    settled(page, app)
    assert users(page) == ["only once"] and page.locator("#input textarea").input_value() == "not now"


# -- kept conversations --------------------------------------------------------------------------

def open_side_panel(page):
    if not page.locator(".sidebar.open").count():
        page.get_by_label("Toggle Sidebar").click()
    page.locator(".sidebar.open").wait_for()
    page.wait_for_function("() => document.querySelector('#chat_list')?.getBoundingClientRect().left >= 0")


def test_chats_survive_a_reload_and_a_server_restart(page, app):
    send(page, "remember me")
    settled(page, app)
    page.reload()
    page.locator('#chatbot [data-testid="user"]').first.wait_for()
    assert users(page) == ["remember me"]
    app.restart()
    page.reload()
    page.locator('#chatbot [data-testid="user"]').first.wait_for()
    assert users(page) == ["remember me"] and bots(page) == [full_reply("remember me")]
    open_side_panel(page)
    assert "remember me" in page.locator("#chat_list").inner_text()


def test_chat_list_new_rename_switch_delete(page, app):
    send(page, "chat A")
    settled(page, app)
    open_side_panel(page)
    page.locator("#new_chat").click()
    page.wait_for_function("() => !document.querySelector('#chatbot [data-testid=\"user\"]')")
    send(page, "chat B")
    settled(page, app)
    page.locator("#rename_box textarea, #rename_box input").first.fill("Bee")
    page.locator("#rename").click()
    page.locator("#chat_list").get_by_text("Bee").wait_for()
    page.locator("#chat_list").get_by_text("chat A").click()
    page.locator('#chatbot [data-testid="user"]').filter(has_text="chat A").wait_for()
    assert users(page) == ["chat A"]
    page.locator("#delete_chat").click()
    page.wait_for_function("() => !document.querySelector('#chat_list')?.innerText.includes('chat A')")
    assert "Bee" in page.locator("#chat_list").inner_text()


def test_another_browser_sees_none_of_these_chats(browser, app):
    a = browser.new_context()
    pa = a.new_page()
    open_page(pa, app.url)
    send(pa, "private to A")
    app.idle()
    b = browser.new_context()
    pb = b.new_page()
    open_page(pb, app.url)
    pb.locator("#input textarea").wait_for()
    pb.wait_for_timeout(500)
    open_side_panel(pb)
    assert "private to A" not in pb.locator("#chat_list").inner_text()
    assert users(pb) == [] and pb.get_by_text("Welcome").is_visible()
    ids = {c["value"] for ctx in (a, b) for c in ctx.cookies() if c["name"] == "chat-browser"}
    assert len(ids) == 2  # two browsers, two ids (in HttpOnly cookies)
    a.close()
    b.close()


# -- feedback, export ----------------------------------------------------------------------------

def train_python():
    py = ROOT / ".venv-train" / "bin" / "python"
    if not py.exists():
        pytest.fail("no training environment: run scripts/setup_train_env.sh (scripts/test.sh does)")
    return py


def test_feedback_and_export_feed_the_training_tools(page, app, tmp_path):
    send(page, "rate me")
    settled(page, app)
    page.locator('#chatbot [data-testid="bot"]').last.hover()
    page.locator("#chatbot").get_by_label("Like").last.click()
    page.wait_for_function("() => true")
    deadline = time.time() + 10
    while time.time() < deadline:  # the like is stored (observable on the server)
        liked = [c for _, c in app.ui.store.all_chats() if any(m.get("feedback") == "like" for m in c.messages)]
        if liked:
            break
        time.sleep(0.05)
    assert liked
    open_side_panel(page)
    page.locator("#export button.label-wrap").click()
    with page.expect_download() as dl:
        page.locator("#export_btn").click()
        page.locator("#export_file a").first.click()
    exported = tmp_path / "one.jsonl"  # the file as the page gave it: the training tools read it as it is
    dl.value.save_as(exported)
    sample = json.loads(exported.read_text(encoding="utf-8"))
    assert sample["messages"][-1] == {"role": "assistant", "content": full_reply("rate me")}
    assert sample["ratings"][-1] == "like"  # the rating travels with the sample
    liked_file = tmp_path / "liked.jsonl"
    r = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-m", "chat_ui.export_feedback", "--history-path",
                        str(app.db), "--out", str(liked_file)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in liked_file.read_text(encoding="utf-8").splitlines()]
    assert any(row["messages"][-1]["content"] == full_reply("rate me") for row in rows)
    for f in ("one.jsonl", "liked.jsonl"):
        v = subprocess.run([str(train_python()), "-m", "training.data.validate", str(tmp_path / f)], cwd=ROOT,
                           capture_output=True, text=True)
        assert v.returncode == 0, v.stdout + v.stderr


def test_import_a_chat(page, app):
    open_side_panel(page)
    page.locator("#export button.label-wrap").click()
    page.locator("#import_box textarea").fill(json.dumps(
        {"messages": [{"role": "user", "content": "imported q"}, {"role": "assistant", "content": "imported a"}]}))
    page.locator("#import_btn").click()
    page.locator('#chatbot [data-testid="user"]').filter(has_text="imported q").wait_for()
    assert bots(page) == ["imported a"]


# -- errors and limits -----------------------------------------------------------------------------

def test_the_counter_warns_at_the_limit_and_nothing_is_cut(page, app):
    box = page.locator("#input textarea")
    box.fill("x" * 310)
    page.locator("#counter").get_by_text("310 / 300 characters").wait_for()
    assert "too long" in page.locator("#counter").inner_text()
    assert page.locator("#counter .over").evaluate("e => getComputedStyle(e).color") == "rgb(185, 28, 28)"
    box.press("Enter")
    page.locator(".toast-body").filter(has_text="has 310 characters; the limit is 300").wait_for()
    assert box.input_value() == "x" * 310  # never silently truncated
    assert users(page) == []


def test_max_new_tokens_is_capped_below_the_context(tiny_model, tmp_path, browser):
    from engines import local_settings

    engine = create_engine(local_settings(tiny_model, session_len=1024))
    settings = AppSettings(host="127.0.0.1", port=free_port(), history_path=str(tmp_path / "c.sqlite3"))
    demo = ChatUI(engine, settings).build()
    launch(demo, settings, prevent_thread_lock=True)
    try:
        pg = browser.new_page()
        open_page(pg, f"http://127.0.0.1:{settings.port}/")
        open_side_panel(pg)
        pg.locator("#settings button.label-wrap").click()
        top = pg.locator("#max_new input[type=range]").get_attribute("max")
        assert int(top) == 1024 - 256
        pg.close()
    finally:
        demo.close()
        engine.close()


def test_backend_down_shows_a_banner_and_readable_errors(browser, tmp_path):
    s = EngineSettings(backend="api")
    port = free_port()
    s.api.base_url, s.api.model, s.api.max_retries = f"http://127.0.0.1:{port}/v1", "m", 0
    engine = create_engine(s)
    settings = AppSettings(host="127.0.0.1", port=free_port(), history_path=str(tmp_path / "c.sqlite3"))
    demo = ChatUI(engine, settings).build()
    launch(demo, settings, prevent_thread_lock=True)
    try:
        pg = browser.new_page(viewport={"width": 1280, "height": 900})
        open_page(pg, f"http://127.0.0.1:{settings.port}/")
        pg.locator("#banner").get_by_text("not reachable right now").wait_for()
        send(pg, "hello")
        pg.locator('#chatbot [data-testid="bot"]').first.wait_for()
        pg.locator("#send").wait_for(state="visible")
        shown = bots(pg)[-1]
        assert "not reachable right now" in shown and "127.0.0.1" not in shown and str(port) not in shown
        pg.locator("#stats").get_by_text("No reply: the model server is not reachable").wait_for()
        assert pg.locator('#chatbot [data-testid="bot"] button[aria-expanded]').count() == 0  # not folded away
        pg.screenshot(path=str(ARTIFACTS / "error.png"))
        pg.close()
    finally:
        demo.close()


# -- first use, accessibility, phone -------------------------------------------------------------------

def contrast(page, selector: str, pseudo: str = "") -> float:
    return page.evaluate("""([sel, pseudo]) => {
        const el = document.querySelector(sel);
        const parse = c => { const m = c.match(/[\\d.]+/g).map(Number); return {rgb: m.slice(0, 3), a: m.length > 3 ? m[3] : 1}; };
        let bg = null;
        for (let e = el; e && !bg; e = e.parentElement) {
            const c = parse(getComputedStyle(e).backgroundColor);
            if (c.a > 0.5) bg = c.rgb;
        }
        bg = bg || [255, 255, 255];
        const fg = parse(getComputedStyle(el, pseudo || null).color).rgb;
        const lum = rgb => { const [r, g, b] = rgb.map(v => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; });
                             return 0.2126 * r + 0.7152 * g + 0.0722 * b; };
        const [a, b] = [lum(fg), lum(bg)].sort((x, y) => y - x);
        return (a + 0.05) / (b + 0.05);
    }""", [selector, pseudo])


def test_first_use_and_accessibility(page, app):
    assert page.get_by_text("Welcome").is_visible()
    assert page.evaluate("() => document.activeElement === document.querySelector('#input textarea')")
    assert page.get_by_label("Message").count() == 1  # the input's name for screen readers
    assert page.locator("#chatbot").get_by_label("Share").count() == 0
    checks = {"#send": contrast(page, "#send"), "placeholder": contrast(page, "#input textarea", "::placeholder"),
              "Retry": contrast(page, "#retry"), "stats": contrast(page, "#stats")}
    page.locator("#chatbot").get_by_role("button", name=re.compile("tell me a story")).click()  # examples send
    streaming(page)
    checks["#stop"] = contrast(page, "#stop")
    tabbable = page.evaluate("() => [...document.querySelectorAll('#chatbot button')]"
                             ".filter(b => b.getAttribute('aria-label') === 'Copy message' && b.tabIndex >= 0).length")
    settled(page, app)
    assert users(page) == ["tell me a story"]
    assert all(v >= 4.5 for v in checks.values()), checks
    assert tabbable >= 1  # each message's Copy (and Like, Edit, ...) can be reached with the keyboard too


def test_a_system_prompt_shows_a_hint(browser, tmp_path):
    a = App(tmp_path, system_prompt="Answer in French.")
    try:
        pg = browser.new_page()
        open_page(pg, a.url)
        pg.locator("#system_hint").get_by_text("System prompt active: “Answer in French.”").wait_for()
        pg.close()
    finally:
        a.demo.close()


def test_screenshots_desktop_and_phone(browser, app):
    ARTIFACTS.mkdir(exist_ok=True)
    for name, viewport in (("desktop", {"width": 1280, "height": 900}), ("phone", {"width": 390, "height": 844})):
        ctx = browser.new_context(viewport=viewport)
        pg = ctx.new_page()
        open_page(pg, app.url)
        pg.locator("#input textarea").wait_for()
        send(pg, "Show me $x^2$ and \\(y_1\\)")
        streaming(pg, min_words=6)
        stop_box = pg.locator("#stop").bounding_box()
        assert stop_box and stop_box["y"] + stop_box["height"] <= viewport["height"]  # Stop in view
        pg.screenshot(path=str(ARTIFACTS / f"{name}_streaming.png"))
        settled(pg, app)
        assert pg.locator("#chatbot .katex").count() >= 2  # both kinds of math rendered
        pg.locator('#chatbot [data-testid="bot"]').last.hover()
        pg.locator("#chatbot").get_by_label("Like").last.click()
        if name == "desktop":
            open_side_panel(pg)
        pg.screenshot(path=str(ARTIFACTS / f"{name}_chat.png"))
        ctx.close()


def test_compare_clear_while_both_stream_empties_both(page, app):
    page.get_by_role("tab", name="Compare").click()
    box = page.locator("#cmp_input textarea")
    box.fill("compare me")
    box.press("Enter")
    page.wait_for_function("() => ['#chat_a', '#chat_b'].every(id => { const b = document.querySelectorAll("
                           "id + ' [data-testid=\"bot\"]'); return b.length && b[b.length - 1].innerText.split(/\\s+/)"
                           ".length >= 8; })")
    page.get_by_role("button", name="Clear", exact=True).last.click()
    settled_compare = lambda: (page.locator('#chat_a [data-testid="user"]').count(),  # noqa: E731
                               page.locator('#chat_b [data-testid="user"]').count())
    app.idle()
    assert eventually(settled_compare, (0, 0)) == (0, 0)
