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
    assert int(cfg.quant_policy) == 8 and cfg.model_format is None


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
