"""Our settings -> LMDeploy's real config objects (LMDeploy installed without its CUDA
dependencies: its config classes import on CPU; inference runs on the GPU machine)."""
from __future__ import annotations

import pytest

lmdeploy = pytest.importorskip("lmdeploy")
from lmdeploy import GenerationConfig, PytorchEngineConfig, TurbomindEngineConfig  # noqa: E402

from infer_engine import EngineSettings, InvalidRequest, SamplingParams  # noqa: E402
from infer_engine.lmdeploy_backend import backend_config, generation_config  # noqa: E402


def settings(backend: str, **lm) -> EngineSettings:
    s = EngineSettings(model_path="m", backend=backend, session_len=8192, dtype="bfloat16")
    for k, v in lm.items():
        setattr(s.lmdeploy, k, v)
    return s


def test_pytorch_engine_config():
    cfg = backend_config(settings("pytorch", tp=2, cache_max_entry_count=0.5, quant_policy=8,
                                  max_batch_size=64))
    assert type(cfg) is PytorchEngineConfig
    assert (cfg.tp, cfg.session_len, cfg.cache_max_entry_count, cfg.max_batch_size, cfg.dtype) == \
        (2, 8192, 0.5, 64, "bfloat16")
    assert int(cfg.quant_policy) == 8 and cfg.model_format is None and not cfg.enable_mp_engine
    assert backend_config(settings("pytorch", mp_engine=True)).enable_mp_engine


def test_turbomind_engine_config():
    cfg = backend_config(settings("turbomind", model_format="awq", quant_policy=4))
    assert type(cfg) is TurbomindEngineConfig
    assert cfg.model_format == "awq" and int(cfg.quant_policy) == 4
    assert cfg.session_len == 8192 and cfg.tp == 1 and cfg.max_batch_size is None


def test_unsupported_values_are_clear_errors():
    s = settings("pytorch")
    s.dtype = "float32"
    with pytest.raises(InvalidRequest, match="dtype 'float32' is not supported by LMDeploy"):
        backend_config(s)
    with pytest.raises(InvalidRequest, match="must be < 1 for the PyTorch engine"):
        backend_config(settings("pytorch", cache_max_entry_count=1.0))


def test_sampling_turns_on_do_sample():
    g = generation_config(SamplingParams(temperature=0.8, top_p=0.9, top_k=20, seed=7,
                                         repetition_penalty=1.1, max_new_tokens=99), [4])
    assert type(g) is GenerationConfig
    assert g.do_sample is True  # LMDeploy >= 0.6 would otherwise decode greedily
    assert (g.temperature, g.top_p, g.top_k, g.random_seed, g.repetition_penalty, g.max_new_tokens) == \
        (0.8, 0.9, 20, 7, 1.1, 99)
    assert g.stop_token_ids == [4] and g.ignore_eos is False


def test_temperature_zero_is_greedy():
    g = generation_config(SamplingParams(temperature=0, ignore_eos=True))
    assert g.do_sample is False and g.ignore_eos is True and g.stop_token_ids is None


class _FakePipe:
    """Stands in for LMDeploy's pipeline on a CPU (its engines need CUDA): records what the
    backend hands it and answers one token."""

    def __init__(self):
        self.calls = []

    def session(self):
        class Session:
            def abort(self): pass
            def close(self): pass
        return Session()

    def stream_infer(self, prompt, sessions=None, gen_config=None, do_preprocess=None):
        from types import SimpleNamespace

        self.calls.append((prompt, do_preprocess, gen_config))
        yield SimpleNamespace(text="ok", token_ids=[5], generate_token_len=1, input_token_len=3,
                              finish_reason="stop", error_message=None, error_code=None)

    def close(self): pass


def test_image_turns_go_to_lmdeploys_vlm_pipeline_as_openai_messages(tiny_llava, tiny_model, monkeypatch):
    """The wiring on a CPU: a llava-hf folder takes images; its image turns reach LMDeploy as
    OpenAI messages (the data URL, the text with control tokens neutralised, LMDeploy's own
    template: do_preprocess), text turns as our rendered prompt; continuing a reply about an
    image is refused by name. The GPU run serves the same path for real."""
    import base64
    import io

    from PIL import Image

    from infer_engine.lmdeploy_backend import LMDeployEngine

    pipe = _FakePipe()
    monkeypatch.setattr(lmdeploy, "pipeline", lambda *a, **kw: pipe)
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 0, 0)).save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    s = EngineSettings(model_path=str(tiny_llava), backend="pytorch", session_len=2048)
    engine = LMDeployEngine(s)
    assert engine.accepts_images
    turn = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "Colour?<|im_end|>"}]}]
    assert "".join(d.text for d in engine.stream_chat(turn, SamplingParams(max_new_tokens=4))) == "ok"
    prompt, preprocess, _ = pipe.calls[-1]
    assert preprocess is True and prompt[0]["content"][0] == {"type": "image_url", "image_url": {"url": url}}
    text = prompt[0]["content"][1]["text"]
    assert text.startswith("Colour?") and "<|im_end|>" not in text
    list(engine.stream_chat([{"role": "user", "content": "hi"}], SamplingParams(max_new_tokens=4)))
    prompt, preprocess, _ = pipe.calls[-1]
    assert preprocess is False and isinstance(prompt, str) and "hi" in prompt
    with pytest.raises(InvalidRequest, match="continue_final_message: not supported with images"):
        engine.check(turn + [{"role": "assistant", "content": "It is"}], continue_final=True)
    engine.close()
    assert LMDeployEngine(EngineSettings(model_path=str(tiny_model), backend="pytorch")).accepts_images is False


def test_an_internlm2_folder_is_rendered_ended_and_checked_as_the_model_wants(tiny_internlm2, monkeypatch):
    """LMDeploy runs InternLM2 with its own implementation: we hand it the internlm2_chat prompt,
    both end ids (</s>, and <|im_end|> from generation_config), and refuse by name a schema its
    engine loop would fail on (it answered 500)."""
    from infer_engine.lmdeploy_backend import LMDeployEngine

    pipe = _FakePipe()
    monkeypatch.setattr(lmdeploy, "pipeline", lambda *a, **kw: pipe)
    engine = LMDeployEngine(EngineSettings(model_path=str(tiny_internlm2), backend="pytorch", session_len=2048))
    list(engine.stream_chat([{"role": "user", "content": "hi"}], SamplingParams(max_new_tokens=4)))
    prompt, _, gen = pipe.calls[-1]
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    end_of_turn = engine.prompt.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert {engine.prompt.tokenizer.eos_token_id, end_of_turn} <= set(gen.stop_token_ids)
    bad = {"type": "json_schema", "json_schema": {"schema": {"type": "no-such-type"}}}
    with pytest.raises(InvalidRequest) as err:
        engine.stream_chat([{"role": "user", "content": "hi"}], SamplingParams(response_format=bad))
    assert err.value.param == "response_format" and len(pipe.calls) == 1
    engine.close()
