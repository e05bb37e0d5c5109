"""What real OpenAI clients send and check, against our server over every backend this
environment has (transformers; the api backend over our own server; LMDeploy on a GPU).
Written after the protocol assertions of peer servers' suites: field shapes, finish_reason
values, usage arithmetic, one finish chunk per choice, [DONE] after errors, status codes."""
from __future__ import annotations

import http.client
import json

import openai
import pytest

from engines import available_backends, open_engine
from infer_engine.server import BackgroundServer, create_app

KEY = "sk-protocol"
USER = [{"role": "user", "content": "你好"}]


@pytest.fixture(scope="module", params=available_backends())
def served(request, tiny_model):
    with open_engine(request.param, tiny_model) as engine, \
            BackgroundServer(create_app(engine, api_key=KEY, model_name="tiny")) as server:
        yield request.param, engine, server


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[2].base_url, api_key=KEY, max_retries=0)


def post(served, body, path="/v1/chat/completions", content_type="application/json"):
    conn = http.client.HTTPConnection("127.0.0.1", served[2].port, timeout=60)
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    conn.request("POST", path, body=data, headers={"Authorization": f"Bearer {KEY}", "Content-Type": content_type})
    resp = conn.getresponse()
    raw = resp.read()
    return resp.status, raw


def post_json(served, body, path="/v1/chat/completions", content_type="application/json"):
    status, raw = post(served, body, path, content_type)
    return status, json.loads(raw)


def events(raw: bytes) -> list:
    out = []
    for line in raw.decode().splitlines():
        if line.startswith("data: "):
            out.append(line[6:] if line[6:] == "[DONE]" else json.loads(line[6:]))
    return out


def fixed(n_tokens: int) -> dict:  # a reply of exactly n tokens, greedy (raw HTTP)
    return {"max_tokens": n_tokens, "temperature": 0, "ignore_eos": True}


def sdk(n_tokens: int, **extra_body) -> dict:  # the same through the openai client
    return {"max_tokens": n_tokens, "temperature": 0, "extra_body": {"ignore_eos": True, **extra_body}}


# 1. conversations that do not end with a user message; the developer role -------------------
def test_a_system_only_conversation_is_answered(client):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "system", "content": "你是小明"}],
                                       **sdk(4))
    assert r.choices[0].message.content and r.usage.completion_tokens == 4


def test_an_assistant_last_message_gets_a_new_reply_or_is_continued(client):
    msgs = USER + [{"role": "assistant", "content": "我是"}]
    new = client.chat.completions.create(model="tiny", messages=msgs, **sdk(4))
    cont = client.chat.completions.create(model="tiny", messages=msgs,
                                          **sdk(4, continue_final_message=True, add_generation_prompt=False))
    prefix = client.chat.completions.create(model="tiny", messages=USER + [
        {"role": "assistant", "content": "我是", "prefix": True}], **sdk(4))
    assert new.choices[0].message.content and cont.choices[0].message.content
    # continuing leaves out the end of the reply and a new reply's header
    assert cont.usage.prompt_tokens < new.usage.prompt_tokens
    assert prefix.choices[0].message.content == cont.choices[0].message.content


def test_the_developer_role_is_the_system_role(client):
    def answer(role):
        return client.chat.completions.create(model="tiny", messages=[{"role": role, "content": "简短回答"}] + USER,
                                              **sdk(6)).choices[0].message.content
    assert answer("developer") == answer("system")


# 2. GET /v1/models/{id} -------------------------------------------------------------------
def test_models_retrieve(client):
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("gpt-x")
    assert info.value.body["code"] == "model_not_found" and info.value.body["param"] == "model"


def test_unknown_routes_answer_in_openai_shape(served):
    status, body = post_json(served, {}, path="/v1/nothing")
    assert status == 404 and body["error"]["type"] == "not_found_error" and body["error"]["code"] is None


# 3. usage holds OpenAI's fields only, and adds up ---------------------------------------------
def test_usage_is_exactly_openais(served):
    status, body = post_json(served, {"model": "tiny", "messages": USER, **fixed(3)})
    assert status == 200
    u = body["usage"]
    assert set(u) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    assert u["completion_tokens"] == 3 and u["total_tokens"] == u["prompt_tokens"] + 3
    assert set(body["timings"]) == {"ttft_s", "decode_tokens_per_s"}  # our figures, beside usage
    assert body["object"] == "chat.completion" and body["choices"][0]["finish_reason"] == "length"
    assert body["choices"][0]["message"]["role"] == "assistant"


# 4./5. stream_options without stream; error codes; bodies that are not JSON -----------------
def test_stream_options_needs_stream(served):
    status, body = post_json(served, {"messages": USER, "stream_options": {"include_usage": True}})
    assert status == 400 and body["error"]["param"] == "stream_options"


@pytest.mark.parametrize("body", [{"messages": []}, {"messages": USER, "model": "gpt-x"}, {"messages": USER, "top_p": 5}])
def test_error_codes_are_strings_or_null(served, body):
    status, payload = post_json(served, body)
    assert status in (400, 404)
    code = payload["error"]["code"]
    assert code is None or isinstance(code, str)


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded"])
def test_a_body_that_is_not_json_is_refused(served, content_type):
    status, payload = post_json(served, json.dumps({"messages": USER}), content_type=content_type)
    assert status == 415 and payload["error"]["type"] == "invalid_request_error"


# n, seed, penalties -----------------------------------------------------------------------------
def test_n_choices_and_their_usage(served):
    status, body = post_json(served, {"messages": USER, "n": 3, **fixed(4)})
    assert status == 200 and [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert all(c["finish_reason"] == "length" for c in body["choices"])
    assert body["usage"]["completion_tokens"] == 12


def test_n_choices_stream_with_one_finish_chunk_each_then_usage_then_done(served):
    status, raw = post(served, {"messages": USER, "n": 2, "stream": True, "stream_options": {"include_usage": True},
                                **fixed(5)})
    ev = events(raw)
    assert status == 200 and ev[-1] == "[DONE]"
    chunks = [e for e in ev[:-1] if e["choices"]]
    finishes = [(c["choices"][0]["index"], c["choices"][0]["finish_reason"]) for c in chunks
                if c["choices"][0]["finish_reason"]]
    assert sorted(finishes) == [(0, "length"), (1, "length")]
    for i in (0, 1):  # the finish chunk is each choice's last
        mine = [c for c in chunks if c["choices"][0]["index"] == i]
        assert mine[-1]["choices"][0]["finish_reason"] == "length"
        assert all(c["object"] == "chat.completion.chunk" for c in mine)
    assert ev[-2]["choices"] == [] and ev[-2]["usage"]["completion_tokens"] == 10


def test_a_seed_makes_sampling_repeatable(client):
    def sample(seed):
        return client.chat.completions.create(model="tiny", messages=USER, max_tokens=12, temperature=1.0,
                                              seed=seed).choices[0].message.content
    assert sample(7) == sample(7)


def test_penalties_are_honoured_or_refused_by_name(served, client):
    backend = served[0]
    args = dict(model="tiny", messages=USER, max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
    if backend == "pytorch":  # LMDeploy's GenerationConfig has repetition_penalty only
        for name in ("frequency_penalty", "presence_penalty"):
            with pytest.raises(openai.BadRequestError) as info:
                client.chat.completions.create(**args, **{name: 1.0})
            assert info.value.body["param"] == name
        return
    plain = client.chat.completions.create(**args).choices[0].message.content
    penalised = client.chat.completions.create(**args, frequency_penalty=2.0).choices[0].message.content
    present = client.chat.completions.create(**args, presence_penalty=2.0).choices[0].message.content
    assert penalised != plain and present != plain


# fields this server refuses by name -----------------------------------------------------------
@pytest.mark.parametrize("extra,param", [
    ({"logprobs": True}, "logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": "x"}}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "no-such-type"}}}},
     "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"logit_bias": {"5": 10}}, "logit_bias"),
    ({"frequency_penalty": 3}, "frequency_penalty"),
    ({"n": 0}, "n"),
])
def test_what_is_not_done_is_refused_naming_the_field(served, extra, param):
    status, body = post_json(served, {"messages": USER, "max_tokens": 2, **extra})
    assert status == 400 and body["error"]["param"] == param, body
    assert served[1].running_sessions() == []


def test_response_format_text_and_tool_choice_none_are_plain_replies(served):
    status, body = post_json(served, {"messages": USER, "response_format": {"type": "text"}, "tool_choice": "none",
                                      **fixed(2)})
    assert status == 200 and body["choices"][0]["message"]["content"]


# constrained decoding: even the random tiny model's reply parses and fits the schema -------
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
          "required": ["name", "age", "tags"], "additionalProperties": False}


def test_response_format_json_schema_gives_valid_json(client):
    import jsonschema

    for seed in range(3):
        r = client.chat.completions.create(
            model="tiny", messages=USER, max_tokens=200, temperature=1.0, seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}})
        assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
        jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)


def test_response_format_json_object_gives_an_object(client):
    """What constrained decoding guarantees: a reply that ended is an object; one cut by
    max_tokens is the start of one (a random model may write one string until the limit:
    LMDeploy's grammar, unlike ours, lets it spend tokens on whitespace too)."""
    r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=200, temperature=0.7, seed=1,
                                       response_format={"type": "json_object"})
    text, finish = r.choices[0].message.content, r.choices[0].finish_reason
    if finish == "stop":
        assert isinstance(json.loads(text), dict)
    else:
        assert finish == "length" and text.lstrip().startswith("{"), (finish, text)


def test_response_format_streams_the_same_json(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    full = client.chat.completions.create(model="tiny", messages=USER, max_tokens=200, temperature=0,
                                          response_format=fmt).choices[0].message.content
    chunks = client.chat.completions.create(model="tiny", messages=USER, max_tokens=200, temperature=0,
                                            response_format=fmt, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full
    json.loads(full)


# /v1/completions ------------------------------------------------------------------------------
def test_completions_stream_and_not(served, client):
    if served[0] == "api":  # the api backend relays chat only: refused by name
        status, body = post_json(served, {"prompt": "Hello", "max_tokens": 4}, path="/v1/completions")
        assert status == 400 and body["error"]["param"] == "prompt"
        return
    full = client.completions.create(model="tiny", prompt="从前有座山，", **sdk(6))
    assert full.object == "text_completion" and full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 6 and full.usage.prompt_tokens > 0
    chunks = list(client.completions.create(model="tiny", prompt="从前有座山，", stream=True,
                                            stream_options={"include_usage": True}, **sdk(6)))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == 6


def test_completions_default_to_16_tokens_and_refuse_what_they_do_not_do(served):
    if served[0] == "api":
        return
    status, body = post_json(served, {"prompt": ["一"], "temperature": 0, "ignore_eos": True}, path="/v1/completions")
    assert status == 200 and body["usage"]["completion_tokens"] == 16
    for extra, param in (({"echo": True}, "echo"), ({"logprobs": 2}, "logprobs"), ({"prompt": ["a", "b"]}, "prompt"),
                         ({"suffix": "x"}, "suffix"), ({"best_of": 2}, "best_of")):
        status, body = post_json(served, {"prompt": "一", **extra}, path="/v1/completions")
        assert status == 400 and body["error"]["param"] == param
