"""Benchmark backends side by side in one run: time to first token and decode tokens/s at 1
and N concurrent sessions, with ratios against the first backend.

    # GPU: random-weight Qwen2-1.5B shape, ours vs LMDeploy's pipeline called directly
    python scripts/bench_engines.py --shape qwen2-1.5b \\
        --backends transformers,pytorch,lmdeploy-pipeline --concurrency 1,64
    # CPU: the tiny model, transformers directly and through our OpenAI server
    python scripts/bench_engines.py --model-path models/tiny-chat --backends transformers,api \\
        --concurrency 1,4 --new-tokens 64

Backends: transformers, pytorch, turbomind, api (our engines; api starts our own server over a
transformers engine unless --api-base-url is given, e.g. LMDeploy's proxy in front of replicas),
lmdeploy-pipeline (LMDeploy's `pipeline().stream_infer` called directly: the baseline our
LMDeploy backend must match). `BACKEND@tpN` runs an LMDeploy one with tensor parallelism over
N GPUs (`--backends pytorch,pytorch@tp2`: one GPU against two, in one run); `transformers@bits4`
loads the weights in 4 bits (bitsandbytes). On a GPU each line also gives the memory our
process holds: the weights (transformers), all once the engine has started (weights, caches,
graphs) and at its peak (for an LMDeploy engine, its own processes are not counted).
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from infer_engine import EngineSettings, SamplingParams, create_engine  # noqa: E402

WORDS = ("the model answers questions about data training evaluation language learning people "
         "city river mountain music science history 你好 世界 学习 模型").split()


@dataclass
class Result:
    backend: str
    n: int
    ttft_ms: float        # mean over streams
    stream_tps: float     # mean decode tokens/s of one stream
    total_tps: float      # all completion tokens / wall time
    tokens: int
    started_gib: float = 0.0  # GPU memory held by this process once the engine started
    peak_gib: float = 0.0     # ... and at most, by the end of this run
    weights_gib: float = 0.0  # ... of which the weights (transformers engines report it)


def prompts(n: int, words: int) -> list[list[dict]]:
    return [[{"role": "user", "content": " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)]
                                                   for j in range(words)) + f" #{i}"}]
            for i in range(n)]


def run_engine(engine, msgs: list[list[dict]], sp: SamplingParams, label: str) -> Result:
    n = len(msgs)
    out: list = [None] * n
    barrier = threading.Barrier(n + 1)

    def one(i: int) -> None:
        barrier.wait()
        t0, first, usage = time.perf_counter(), None, None
        for d in engine.stream_chat(msgs[i], sp, f"bench-{label}-{i}"):
            if first is None and d.text:
                first = time.perf_counter()
            usage = d.usage or usage
        out[i] = (first - t0 if first else float("nan"), usage)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    tokens = sum(u.completion_tokens for _, u in out)
    return Result(label, n, 1000 * statistics.mean(t for t, _ in out),
                  statistics.mean(u.decode_tokens_per_s or 0.0 for _, u in out), tokens / wall, tokens)


def run_pipeline(pipe, texts: list[str], gen_config, label: str) -> Result:
    """LMDeploy's own pipeline, all prompts in one stream_infer call (its multiplexed iterator)."""
    n = len(texts)
    first: list = [None] * n
    last: list = [None] * n
    count = [0] * n
    t0 = time.perf_counter()
    for out in pipe.stream_infer(texts, gen_config=gen_config, do_preprocess=False):
        now = time.perf_counter()
        i = out.index
        if out.text and first[i] is None:
            first[i] = now
        last[i], count[i] = now, out.generate_token_len
    wall = time.perf_counter() - t0
    # decode rate of a stream: tokens after the first chunk over the time after it
    rates = [(count[i] - 1) / (last[i] - first[i]) if first[i] and last[i] > first[i] else 0.0
             for i in range(n)]
    return Result(label, n, 1000 * statistics.mean((first[i] or t0) - t0 for i in range(n)),
                  statistics.mean(rates), sum(count) / wall, sum(count))


def engine_settings(args, backend: str, model: str) -> EngineSettings:
    backend, _, option = backend.partition("@")
    s = EngineSettings(model_path=model, backend=backend, session_len=args.session_len,
                       dtype=args.dtype)
    if option:
        kind, number = option[:-1], option[-1:]
        if kind not in ("tp", "bits") or not number.isdigit():
            raise SystemExit(f"error: {backend}@{option}: expected BACKEND@tpN or transformers@bits4|8")
        if kind == "tp":
            s.lmdeploy.tp = int(number)
        else:
            s.bits = int(number)
    s.lmdeploy.cache_max_entry_count = args.cache_max_entry_count
    s.lmdeploy.max_batch_size = max(args.concurrency)
    return s


def bench_backend(args, backend: str, model: str, sp: SamplingParams) -> list[Result]:
    results = []
    if backend.partition("@")[0] == "lmdeploy-pipeline":
        from lmdeploy import pipeline

        from infer_engine.lmdeploy_backend import backend_config, generation_config
        from infer_engine.prompts import ChatPrompt

        s = engine_settings(args, backend.replace("lmdeploy-pipeline", "pytorch"), model)
        chat = ChatPrompt.from_pretrained(model, s.chat_template)
        pipe = pipeline(model, backend_config=backend_config(s), log_level="WARNING")
        gen = generation_config(sp, chat.stop_token_ids)
        try:
            warm = generation_config(SamplingParams(**{**sp.__dict__, "max_new_tokens": 8}), chat.stop_token_ids)
            for n in args.concurrency:  # warm up at each batch size (CUDA graphs are captured per size)
                run_pipeline(pipe, [chat.text(m) for m in prompts(n, args.prompt_words)], warm, backend)
            for n in args.concurrency:
                results.append(run_pipeline(pipe, [chat.text(m) for m in prompts(n, args.prompt_words)],
                                            gen, backend))
                print(fmt(results[-1]), flush=True)
        finally:
            pipe.close()
        return results

    server = served = None
    if backend == "api":
        s = EngineSettings(backend="api")
        if args.api_base_url:
            s.api.base_url, s.api.api_key, s.api.model = args.api_base_url, args.api_key, args.api_model
        else:  # our own OpenAI server over a transformers engine on the same model
            from infer_engine.server import BackgroundServer, create_app
            served = create_engine(engine_settings(args, "transformers", model))
            server = BackgroundServer(create_app(served)).__enter__()
            s.api.base_url = server.base_url
    else:
        s = engine_settings(args, backend, model)
    engine = create_engine(s)
    started = gpu_gib()
    try:
        warm = SamplingParams(**{**sp.__dict__, "max_new_tokens": 8})
        for n in args.concurrency:  # warm up at each batch size (CUDA graphs are captured per size)
            run_engine(engine, prompts(n, args.prompt_words), warm, backend)
        for n in args.concurrency:
            results.append(run_engine(engine, prompts(n, args.prompt_words), sp, backend))
            results[-1].started_gib, results[-1].peak_gib = started, gpu_gib(peak=True)
            results[-1].weights_gib = getattr(engine, "weights_gib", 0.0)
            print(fmt(results[-1]), flush=True)
    finally:
        engine.close()
        if server:
            server.__exit__(None, None, None)
            served.close()
    return results


def run_isolated(backend: str, model: str) -> list[Result]:
    """This script again, for one backend, in a fresh process; results come back as JSON."""
    argv = [a for a in sys.argv[1:]]
    for flag in ("--shape", "--model-path", "--backends"):  # replaced below
        while flag in argv:
            i = argv.index(flag)
            del argv[i:i + 2]
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        done = subprocess.run([sys.executable, __file__, *argv, "--model-path", model, "--backends", backend,
                               "--json-out", out.name])
        if done.returncode != 0:  # one backend failing leaves the others' figures standing
            print(f"{backend}: failed (exit {done.returncode}; its output is above)", flush=True)
            return []
        return [Result(**r) for r in json.loads(Path(out.name).read_text())]


def fmt(r: Result, base: Result | None = None) -> str:
    ratio = f"{r.total_tps / base.total_tps:8.2f}x" if base and base.total_tps else "        -"
    memory = f" {r.weights_gib or float('nan'):>11.2f} {r.started_gib:>9.2f} {r.peak_gib:>8.2f}" if r.peak_gib else ""
    return (f"{r.backend:<18} {r.n:>4} {r.ttft_ms:>10.1f} {r.stream_tps:>14.1f} {r.total_tps:>12.1f} "
            f"{ratio}{memory}")


def gpu_gib(peak: bool = False) -> float:
    """GiB of GPU memory this process holds now (or at most so far); 0 without CUDA."""
    if not _cuda():
        return 0.0
    import torch

    return (torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()) / 2**30


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def free_memory() -> None:
    gc.collect()
    try:
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model-path")
    src.add_argument("--shape", help="random-weight model of a real size (see build_tiny_model.py)")
    p.add_argument("--backends", default="transformers",
                   help="comma list: transformers, pytorch, turbomind, api, lmdeploy-pipeline")
    p.add_argument("--concurrency", default="1,8", help="comma list of concurrent sessions")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--backend-new-tokens", action="append", default=[], metavar="BACKEND=N",
                   help="fewer tokens for a slow backend, e.g. transformers=32 (tok/s stay comparable)")
    p.add_argument("--prompt-words", type=int, default=64)
    p.add_argument("--session-len", type=int, default=4096)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--cache-max-entry-count", type=float, default=0.5)
    p.add_argument("--api-base-url", default="")
    p.add_argument("--api-key", default="EMPTY")
    p.add_argument("--api-model", default="")
    p.add_argument("--same-process", action="store_true",
                   help="run every backend in this process (default: a fresh process each, so one "
                        "engine's leftover threads and GPU memory cannot slow the next)")
    p.add_argument("--json-out", help=argparse.SUPPRESS)  # a child process reports here
    args = p.parse_args()
    args.concurrency = [int(x) for x in args.concurrency.split(",")]
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]

    model = args.model_path
    tmp = None
    if args.shape:
        sys.path.insert(0, str(ROOT / "scripts"))
        import build_tiny_model
        import torch
        tmp = tempfile.TemporaryDirectory(prefix="bench-model-")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = str(build_tiny_model.build(Path(tmp.name) / args.shape, shape=args.shape, device=device))
        free_memory()

    sp = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    print(f"model={args.shape or model} new_tokens={args.new_tokens} prompt_words={args.prompt_words}")
    header = (f"{'backend':<18} {'N':>4} {'TTFT ms':>10} {'tok/s/stream':>14} {'total tok/s':>12} {'vs first':>9}"
              + (f" {'weights GiB':>11} {'start GiB':>9} {'peak GiB':>8}" if _cuda() else ""))
    print(header, flush=True)
    results: list[Result] = []
    per_backend = dict(x.split("=", 1) for x in args.backend_new_tokens)
    for b in backends:
        n_tokens = int(per_backend.get(b, args.new_tokens))
        if args.same_process or len(backends) == 1:
            results += bench_backend(args, b, model, SamplingParams(**{**sp.__dict__, "max_new_tokens": n_tokens}))
            free_memory()
        else:
            results += run_isolated(b, model)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps([r.__dict__ for r in results]))
        return

    print("\n" + header)
    for r in results:
        base = next(x for x in results if x.n == r.n)
        print(fmt(r, base))
    if len({r.backend for r in results}) < len(backends):
        sys.exit(1)
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
