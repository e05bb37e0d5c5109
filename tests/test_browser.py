"""What a person sees: headless Chromium (Debian's) opens the app, sends a message, watches the
reply stream in, and saves a screenshot under tests/artifacts/. The engine is the synthetic one
(a fixed 1500-token reply at a fixed pace), so what is asserted never depends on sampling."""
from __future__ import annotations

import shutil
import time

import pytest

from chat_ui.settings import AppSettings
from chat_ui.ui import ChatUI, launch
from conftest import ROOT
from engines import synthetic
from infer_engine.server import free_port

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = ROOT / "tests" / "artifacts"


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    engine = synthetic(tokens_per_s=400, reply_tokens=1500, name="tiny-chat")
    settings = AppSettings(host="127.0.0.1", port=free_port(), max_new_tokens=1500,
                           history_path=str(tmp_path_factory.mktemp("chats") / "chats.sqlite3"),
                           title="Tiny chat", examples="write a long story|What can you do?")
    demo = ChatUI(engine, settings).build()
    launch(demo, settings, prevent_thread_lock=True)
    yield f"http://127.0.0.1:{settings.port}/"
    demo.close()
    engine.close()


def test_a_person_chats_and_sees_the_reply_stream(app_url):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1100, "height": 950})
        page.goto(app_url)
        box = page.locator("#input textarea")
        box.fill("write a long story")
        box.press("Enter")

        lengths, stats = [], ""
        deadline = time.time() + 120
        while time.time() < deadline:
            bots = page.locator('#chatbot [data-testid="bot"]')
            stats = page.locator("#stats").inner_text()
            if bots.count():
                lengths.append(len(bots.last.inner_text()))
            if "tokens" in stats:
                break
            time.sleep(0.03)
        page.screenshot(path=str(ARTIFACTS / "chat.png"))
        user_text = page.locator('#chatbot [data-testid="user"]').last.inner_text()
        browser.close()

    assert "write a long story" in user_text
    assert "1500 tokens" in stats and "first token" in stats
    final = lengths[-1]
    partial = [n for n in lengths if 0 < n < final]
    assert final > 500 and len(set(partial)) >= 3, f"reply did not stream: {lengths[:20]}"
    assert (ARTIFACTS / "chat.png").stat().st_size > 10_000
