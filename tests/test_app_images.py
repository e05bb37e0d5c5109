"""Images in the chat app, as a visitor and an API client send them: a real Gradio server on
127.0.0.1, gradio_client and plain HTTP. UI behaviour runs over the synthetic engine taking
images ("You said: ... (1 image)"); one turn runs the tiny LLaVA the project builds."""
from __future__ import annotations

import base64
import io
from pathlib import Path

import httpx
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from chat_ui.history import text_of
from chat_ui.ui import ChatUI, launch
from engines import local_settings, synthetic
from infer_engine import EngineSettings, create_engine
from test_app import GREEDY, app_settings, call, post, turns

QUESTION = "What colour is the square?"


def image_engine(name: str = "tiny-llava"):
    s = EngineSettings(backend="synthetic")
    s.synthetic.tokens_per_s, s.synthetic.model_name, s.synthetic.accepts_images = 400, name, True
    return create_engine(s)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """An image model, and a text-only one in the Compare tab."""
    engine, base = image_engine(), synthetic(tokens_per_s=400, name="base")
    settings = app_settings(tmp_path_factory, max_image_mb=1, model_label="tiny-llava", compare_label="base")
    ui = ChatUI(engine, settings, compare=base)
    demo = ui.build()
    launch(demo, settings, prevent_thread_lock=True)
    yield f"http://127.0.0.1:{settings.port}/", ui, settings.port
    demo.close()
    engine.close()
    base.close()


@pytest.fixture(scope="module")
def text_app(tmp_path_factory):
    engine = synthetic(tokens_per_s=400, name="tiny-chat")
    settings = app_settings(tmp_path_factory)
    demo = ChatUI(engine, settings).build()
    launch(demo, settings, prevent_thread_lock=True)
    yield f"http://127.0.0.1:{settings.port}/", settings.port
    demo.close()
    engine.close()


def picture(path, size=(1500, 800), color=(30, 90, 220), fmt="PNG"):
    Image.new("RGB", size, color).save(path, fmt)
    return path


def send(c: Client, text: str, files=(), max_new: int = 24):
    return c.predict({"text": text, "files": [handle_file(str(f)) for f in files]}, "", max_new, *GREEDY,
                     api_name="/send")


def kept_chat(ui: ChatUI):
    """The store's one chat that holds a question (each API client gets a browser of its own)."""
    for _browser, chat in ui.store.all_chats():
        yield chat


def stored_image(ui: ChatUI, text: str) -> Image.Image:
    for chat in kept_chat(ui):
        for m in chat.messages:
            if m["role"] == "user" and m["content"] == text and m.get("images"):
                url = m["images"][0]
                assert url.startswith("data:image/jpeg;base64,")
                return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    raise AssertionError(f"no kept question {text!r} with an image")


def test_an_image_turn_through_gradio_client_is_answered_and_kept(app, tmp_path):
    c = Client(app[0], verbose=False)
    history, box, stats = send(c, QUESTION, [picture(tmp_path / "square.png")])
    assert turns(history) == [("user", QUESTION), ("assistant", f"You said: {QUESTION} (1 image)")]
    assert box == "" and "tokens" in stats
    im = stored_image(app[1], QUESTION)
    assert im.size == (1024, 546)  # kept scaled to 1024 px a side, as a JPEG
    assert im.getpixel((500, 300))[2] > 180  # still the blue square
    # the next question, text only, is asked with the image still in the conversation
    history, _, _ = send(c, "And its shape?")  # (an image model's /send takes {"text", "files"})
    assert text_of(history[-1]["content"]) == "You said: And its shape?"
    assert [r for r, _ in turns(history)] == ["user", "assistant", "user", "assistant"]


def test_two_images_in_one_message(app, tmp_path):
    c = Client(app[0], verbose=False)
    files = [picture(tmp_path / "a.png"), picture(tmp_path / "b.jpg", (64, 64), (200, 30, 30), "JPEG")]
    history, _, _ = send(c, "Which is red?", files)
    assert text_of(history[-1]["content"]) == "You said: Which is red? (2 images)"
    with pytest.raises(AppError, match="At most 4 images in one message"):
        send(c, "Five?", [picture(tmp_path / f"{i}.png", (32, 32)) for i in range(5)])


def bomb(path):
    Image.new("1", (20000, 20000), 0).save(path, "PNG")
    return path


@pytest.mark.parametrize("make,expect", [
    (lambda p: (p / "notes.png").write_bytes(b"this is not an image") and p / "notes.png",
     "notes.png: not a readable image"),
    (lambda p: (p / "cut.png").write_bytes(picture(p / "whole.png").read_bytes()[:2000]) and p / "cut.png",
     "cut.png: not a readable image"),
    (lambda p: bomb(p / "bomb.png"), "bomb.png: more than 32,000,000 pixels"),
])
def test_bad_images_are_refused_with_a_clear_message_and_nothing_kept(app, tmp_path, make, expect):
    """Checked on arrival: the upload itself is refused (400, the reason), before Gradio keeps
    a byte (100 uploads of 10 MB of noise named .png were all kept before)."""
    from chat_ui.images import upload_folder

    before = {p for p in upload_folder().rglob("*") if p.is_file()}
    path = make(tmp_path)
    status, body = upload(app[2], path.name, path.read_bytes())
    assert status == 400 and "That image cannot be used" in body.decode() and expect in body.decode(), body
    assert {p for p in upload_folder().rglob("*") if p.is_file()} <= before
    c = Client(app[0], verbose=False)
    with pytest.raises(httpx.HTTPStatusError, match="400 Bad Request"):  # gradio_client's upload: refused too
        send(c, "Look at this", [path])
    assert not any(m["content"] == "Look at this" for chat in kept_chat(app[1]) for m in chat.messages)


def upload(port: int, name: str, raw: bytes) -> tuple[int, bytes]:
    boundary = "----chat-app-test"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + raw + f"\r\n--{boundary}--\r\n".encode()
    return post(port, "/gradio_api/upload", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})


def test_an_image_over_the_size_limit_is_refused_at_upload(app):
    raw = b"\x89PNG" + bytes(int(1.5 * 2**20))  # the app takes 1 MB images
    status, body = upload(app[2], "big.png", raw)
    assert status == 413 and b"big.png: larger than 1 MB, the most one image may be" in body, body


def test_a_file_the_app_did_not_receive_is_never_read(app):
    event, _ = call(app[2], "send", [{"text": "read this", "files": [{"path": "/etc/hostname", "meta": {
        "_type": "gradio.FileData"}}]}, "", 8, *GREEDY], "imgtest1")
    assert event == "error"
    assert not any(m["content"] == "read this" for chat in kept_chat(app[1]) for m in chat.messages)


def test_only_files_inside_the_upload_folder_are_taken(tmp_path):
    from chat_ui.images import upload_folder, uploaded_paths
    from infer_engine import InvalidRequest

    inside = upload_folder() / "test-images"
    inside.mkdir(parents=True, exist_ok=True)
    ok = picture(inside / "ok.png", (8, 8))
    link = inside / "link.png"
    link.unlink(missing_ok=True)
    link.symlink_to("/etc/hostname")  # inside by name, outside in fact
    assert uploaded_paths([str(ok), {"path": str(ok)}]) == [ok.resolve()] * 2
    for bad in (str(link), "/etc/hostname", str(inside / ".." / ".." / "etc"), {"path": 3}):
        with pytest.raises(InvalidRequest, match="files\\[0\\]"):
            uploaded_paths([bad])


def test_a_text_only_model_says_it_takes_no_images(text_app, tmp_path):
    status, _ = upload(text_app[1], "square.png", picture(tmp_path / "s.png").read_bytes())
    assert status == 403  # no component takes files: the upload itself is refused
    event, data = call(text_app[1], "send", [{"text": "what is it?", "files": ["x.png"]}, "", 8,
                                             *GREEDY], "imgtest2")
    assert event == "error" and "This model (tiny-chat) takes no images, only text." in str(data), data


def test_compare_with_an_image_the_text_only_model_says_so_and_the_other_answers(app, tmp_path):
    c = Client(app[0], verbose=False)
    pic = {"text": QUESTION, "files": [handle_file(str(picture(tmp_path / "c.png")))]}
    a, b, _box, stats_a, stats_b = c.predict(pic, "", 24, *GREEDY, api_name="/compare")
    assert turns(a) == [("user", QUESTION), ("assistant", f"You said: {QUESTION} (1 image)")]
    assert turns(b) == [("user", QUESTION), ("assistant", "⚠️ base takes no images, only text.")]
    assert "tokens" in stats_a and stats_b == ""
    # a text question next: both answer (the refused image question is not asked of base again)
    a, b, *_ = c.predict({"text": "And in words?", "files": []}, "", 24, *GREEDY, api_name="/compare")
    assert text_of(a[-1]["content"]) == text_of(b[-1]["content"]) == "You said: And in words?"


def test_the_tiny_llava_answers_an_image_turn_in_the_app(tiny_llava, tmp_path_factory, tmp_path):
    engine = create_engine(local_settings(str(tiny_llava)))
    settings = app_settings(tmp_path_factory)
    ui = ChatUI(engine, settings)
    demo = ui.build()
    launch(demo, settings, prevent_thread_lock=True)
    try:
        c = Client(f"http://127.0.0.1:{settings.port}/", verbose=False)
        history, _, stats = send(c, QUESTION, [picture(tmp_path / "red.png", (64, 64), (220, 20, 20))], max_new=8)
        assert [r for r, _ in turns(history)] == ["user", "assistant"]
        assert text_of(history[-1]["content"]).strip() and not text_of(history[-1]["content"]).startswith("⚠️")
        assert "tokens" in stats
        assert stored_image(ui, QUESTION).size == (64, 64)
    finally:
        demo.close()
        engine.close()


def test_a_kept_image_is_shown_again_after_the_cache_sweep(tmp_path):
    from chat_ui.images import from_upload, shown_file

    url = from_upload(picture(tmp_path / "p.png", (40, 30)), "p.png")
    path = shown_file(url)
    Path(path).unlink()  # what delete_cache does to a file unused for an hour
    assert shown_file(url) == path and Image.open(path).size == (40, 30)
