"""Images in the chat page, in headless Chromium: add one with the clip (a file input), send,
see it in the history and after a reload; the size limit said in the box and enforced; the
Compare tab with an image and a text-only model; a text-only model's page has no clip. The
engine is the synthetic one taking images, so every check waits for an observable state."""
from __future__ import annotations

import pytest
from PIL import Image

from chat_ui.settings import AppSettings
from chat_ui.ui import ChatUI, launch
from conftest import open_page
from engines import synthetic
from infer_engine.server import free_port
from test_app_images import QUESTION, image_engine
from test_chat_page import ARTIFACTS, bots, users

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    db = tmp_path_factory.mktemp("image-page") / "chats.sqlite3"
    settings = AppSettings(host="127.0.0.1", port=free_port(), history_path=str(db), title="Tiny LLaVA",
                           max_image_mb=1, model_label="tiny-llava", compare_label="base")
    engine, base = image_engine(), synthetic(tokens_per_s=200, name="base")
    demo = ChatUI(engine, settings, compare=base).build()
    launch(demo, settings, prevent_thread_lock=True)
    yield f"http://127.0.0.1:{settings.port}/"
    demo.close()


@pytest.fixture
def page(browser, app):
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = ctx.new_page()
    open_page(pg, app)
    pg.locator("#input textarea").wait_for()
    yield pg
    ctx.close()


def add_image(page, path, box: str = "#input"):
    """The clip's file input takes the file; wait until its thumbnail shows in the box."""
    page.locator(f"{box} input[type=file]").set_input_files(str(path))
    page.locator(f"{box} img").first.wait_for()


def square(path, color=(30, 90, 220), size=(320, 240)):
    Image.new("RGB", size, color).save(path)
    return path


def test_an_image_is_sent_shown_in_the_history_and_kept(page, tmp_path):
    assert "1 MB each" in page.locator("#input textarea").get_attribute("placeholder")
    add_image(page, square(tmp_path / "blue.png"))
    page.locator("#input textarea").fill(QUESTION)
    page.locator("#input textarea").press("Enter")
    page.locator('#chatbot [data-testid="bot"]').filter(has_text="(1 image)").wait_for()
    assert bots(page)[-1].strip() == f"You said: {QUESTION} (1 image)"
    shown = page.locator('#chatbot [data-testid="user"] img').first
    shown.wait_for()
    page.wait_for_function("() => { const i = document.querySelector('#chatbot [data-testid=\"user\"] img');"
                           " return i && i.complete && i.naturalWidth === 320; }")
    assert page.locator("#input img").count() == 0  # the box is empty again
    page.screenshot(path=str(ARTIFACTS / "image_chat.png"))
    page.reload()
    page.locator('#chatbot [data-testid="user"] img').first.wait_for()
    page.wait_for_function("() => { const i = document.querySelector('#chatbot [data-testid=\"user\"] img');"
                           " return i && i.complete && i.naturalWidth === 320; }")
    assert any(QUESTION in u for u in users(page))


def test_an_image_over_the_limit_is_refused_in_the_page(page, tmp_path):
    big = tmp_path / "big.png"
    Image.effect_noise((1200, 1200), 80).convert("RGB").save(big)  # noise: ~4 MB as PNG
    assert big.stat().st_size > 2**20
    page.locator("#input input[type=file]").set_input_files(str(big))
    said = page.locator('[data-testid="toast-text"]').filter(has_text="exceed")
    said.wait_for()  # Gradio's own check, at the limit the app gave it
    assert 'maximum allowed size of 1.0 Mb: "big.png"' in said.inner_text()
    assert page.locator("#input img").count() == 0  # nothing attached
    page.wait_for_timeout(800)  # (only for the picture: the toast's fade-in)
    page.screenshot(path=str(ARTIFACTS / "image_too_big.png"))


def test_compare_with_an_image_the_text_only_model_says_so(page, tmp_path):
    page.get_by_role("tab", name="Compare").click()
    page.locator("#cmp_input textarea").wait_for()
    add_image(page, square(tmp_path / "red.png", (220, 30, 30)), "#cmp_input")
    page.locator("#cmp_input textarea").fill("Which colour?")
    page.locator("#cmp_send").click()
    page.locator('#chat_a [data-testid="bot"]').filter(has_text="(1 image)").wait_for()
    page.locator('#chat_b [data-testid="bot"]').filter(has_text="base takes no images, only text.").wait_for()
    page.locator('#chat_a [data-testid="user"] img').first.wait_for()


def test_a_text_only_models_page_has_no_clip(browser, tmp_path):
    settings = AppSettings(host="127.0.0.1", port=free_port(), history_path=str(tmp_path / "c.sqlite3"))
    engine = synthetic(name="tiny-chat")
    demo = ChatUI(engine, settings).build()
    launch(demo, settings, prevent_thread_lock=True)
    try:
        pg = browser.new_page()
        open_page(pg, f"http://127.0.0.1:{settings.port}/")
        pg.locator("#input textarea").wait_for()
        assert pg.locator("#input input[type=file]").count() == 0
        pg.close()
    finally:
        demo.close()
