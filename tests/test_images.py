"""Images in chat messages: an image-chat turn through the openai client on a tiny LLaVA, the
api backend relaying it, and every bad image refused with a 400 naming the part (never a
crash, never a fetch of a URL a client chose)."""
from __future__ import annotations

import base64
import http.server
import io
import json
import threading

import openai
import pytest
from PIL import Image

from engines import local_settings
from infer_engine import EngineSettings, InvalidRequest, create_engine
from infer_engine.server import BackgroundServer, create_app

KEY = "sk-images"


def png(color=(220, 20, 20), size=(48, 40), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color if mode == "RGB" else 0).save(buf, "PNG")
    return buf.getvalue()


def jpeg() -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((96, 96), 60).convert("RGB").save(buf, "JPEG")
    return buf.getvalue()


def data_url(raw: bytes, kind: str = "image/png") -> str:
    return f"data:{kind};base64,{base64.b64encode(raw).decode()}"


def turn(url: str, text: str = "What colour is the square?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def llava(tiny_llava):
    with create_engine(local_settings(tiny_llava)) as engine, \
            BackgroundServer(create_app(engine, api_key=KEY, max_body_bytes=8 * 2**20)) as server:
        yield engine, server


@pytest.fixture(scope="module")
def client(llava):
    return openai.OpenAI(base_url=llava[1].base_url, api_key=KEY, max_retries=0)


GREEDY = dict(max_tokens=6, temperature=0, extra_body={"ignore_eos": True})


def test_an_image_chat_turn_through_the_openai_client(client):
    with_image = client.chat.completions.create(model="tiny-llava", messages=turn(data_url(png())), **GREEDY)
    text_only = client.chat.completions.create(
        model="tiny-llava", messages=[{"role": "user", "content": "What colour is the square?"}], **GREEDY)
    assert with_image.choices[0].message.content and with_image.usage.completion_tokens == 6
    # the image became the model's 64 image tokens (8x8 patches) plus a line break
    assert with_image.usage.prompt_tokens - text_only.usage.prompt_tokens >= 64


def test_the_image_changes_what_the_model_sees(client):
    def answer(color):
        return client.chat.completions.create(model="tiny-llava", messages=turn(data_url(png(color))),
                                              max_tokens=12, temperature=0,
                                              extra_body={"ignore_eos": True}).choices[0].message.content
    # a random vision tower still maps different pixels to different features
    assert len({answer((255, 0, 0)), answer((0, 0, 255)), answer((0, 255, 0)), answer((255, 255, 255))}) > 1


def test_typed_image_tokens_stay_text(client):
    typed = client.chat.completions.create(model="tiny-llava", messages=[
        {"role": "user", "content": "<image>" * 3 + " What colour?"}], **GREEDY)
    assert typed.usage.prompt_tokens < 64  # never expanded into image features


def test_the_api_backend_relays_images(llava):
    s = EngineSettings(backend="api")
    s.api.base_url, s.api.api_key = llava[1].base_url, KEY
    with create_engine(s) as relay:  # by default the remote model is taken to be text-only
        with pytest.raises(InvalidRequest, match="takes no images"):
            relay.check(turn(data_url(png())))
    s.api.images = True
    with create_engine(s) as relay, BackgroundServer(create_app(relay, api_key=KEY)) as front:
        c = openai.OpenAI(base_url=front.base_url, api_key=KEY, max_retries=0)
        direct = openai.OpenAI(base_url=llava[1].base_url, api_key=KEY, max_retries=0)
        args = dict(model="tiny-llava", messages=turn(data_url(png())), max_tokens=6, temperature=0)
        assert c.chat.completions.create(**args).choices[0].message.content == \
            direct.chat.completions.create(**args).choices[0].message.content


class _Recorder(http.server.BaseHTTPRequestHandler):
    hits: list = []

    def do_GET(self):  # noqa: N802
        _Recorder.hits.append(self.path)
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.end_headers()
        self.wfile.write(png())

    def log_message(self, *a):
        pass


def post(server, body):
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read())


def bomb() -> bytes:
    return png(size=(20000, 20000), mode="1")


@pytest.mark.parametrize("url,expect", [
    (data_url(b"this is not an image"), "not a readable image"),
    (data_url(png()[: len(png()) // 2]), "not a readable image"),
    (data_url(jpeg()[:-200]), "not a readable image"),
    (None, "decompression bomb"),  # filled in below: 20000x20000
    ("data:image/png;base64,@@@not-base64@@@", "not valid base64"),
    ("file:///etc/passwd", "expected a data:image"),
    ("/etc/passwd", "expected a data:image"),
])
def test_bad_images_get_a_400_naming_the_part(llava, url, expect):
    url = url or data_url(bomb())
    status, body = post(llava[1], {"messages": turn(url), "max_tokens": 2})
    assert status == 400 and expect in body["error"]["message"], body
    assert body["error"]["param"] == "messages[0].content[0].image_url"
    assert llava[0].running_sessions() == []


def test_cut_images_are_refused_even_when_pil_is_told_to_accept_them(llava, monkeypatch):
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # what importing LMDeploy's vl does
    for raw in (png()[: len(png()) // 2], jpeg()[:-200]):
        status, body = post(llava[1], {"messages": turn(data_url(raw)), "max_tokens": 2})
        assert status == 400 and "not a readable image" in body["error"]["message"], body
    status, _ = post(llava[1], {"messages": turn(data_url(jpeg())), "max_tokens": 2})
    assert status == 200


def test_a_remote_url_is_never_fetched(llava):
    httpd = http.server.HTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/cat.png"
        status, body = post(llava[1], {"messages": turn(url), "max_tokens": 2})
        assert status == 400 and "not fetched" in body["error"]["message"]
        assert _Recorder.hits == []
    finally:
        httpd.shutdown()


def test_a_30_mb_image_is_refused_before_it_is_read(llava):
    huge = data_url(b"\x89PNG" + b"\0" * (30 * 2**20))
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", llava[1].port, timeout=60)
    conn.request("POST", "/v1/chat/completions", body=json.dumps({"messages": turn(huge)}),
                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 413  # over the server's body limit: never parsed
    engine = llava[0]
    from infer_engine import InvalidRequest
    with pytest.raises(InvalidRequest, match="larger than 10 MB"):  # the engine's own limit, for other callers
        engine.check(turn(huge))


def test_images_in_non_user_messages_and_too_many_are_refused(llava):
    url = data_url(png())
    status, body = post(llava[1], {"messages": [{"role": "system", "content": [
        {"type": "image_url", "image_url": {"url": url}}]}, {"role": "user", "content": "hi"}]})
    assert status == 400 and body["error"]["param"] == "messages[0].content"
    parts = [{"type": "image_url", "image_url": {"url": url}}] * 9
    status, body = post(llava[1], {"messages": [{"role": "user", "content": parts}]})
    assert status == 400 and "at most 8 images" in body["error"]["message"]


def test_a_text_only_model_says_it_takes_no_images(tiny_model):
    with create_engine(local_settings(tiny_model)) as engine, \
            BackgroundServer(create_app(engine, api_key=KEY)) as server:
        status, body = post(server, {"messages": turn(data_url(png())), "max_tokens": 2})
    assert status == 400 and "takes no images" in body["error"]["message"]
    assert body["error"]["param"] == "messages[0].content"
