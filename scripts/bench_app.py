"""What a person at the public URL gets, next to what the engine can do: the same prompts
answered (a) by the engine called directly, (b) through our OpenAI server, (c) through the
Gradio app, at several numbers of concurrent users, all in one run. Clients are plain HTTP
(SSE) spread over several processes; their CPU is printed so it is clear they are not the
bottleneck. Each path runs in a fresh process that holds the only copy of the model.

    # CPU, no model: the synthetic engine at 100 tokens/s per stream, 150-token replies
    .venv/bin/python scripts/bench_app.py --backend synthetic --synthetic-tokens-per-s 100 \\
        --synthetic-reply-tokens 150 --users 1,16,64,128
    # GPU: LMDeploy's PyTorch engine on a random-weight InternLM2-1.8B shape, 256 new tokens
    python scripts/bench_app.py --backend pytorch --model-path /tmp/internlm2-1.8b --new-tokens 256 \\
        --users 1,16,64

Printed per path and number of users: mean time to first token, mean per-stream time, total
completion tokens/s, the ratios to the engine's own figures, the p90 gap between two updates a
user sees, and the clients' CPU use (busiest client process, percent of one core).
"""
from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing as mp
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = ("the model answers questions about data training evaluation language learning people "
         "city river mountain music science history").split()
GREEDY = [0.0, 0.8, 40, 1.0]  # the app's temperature, top_p, top_k, repetition_penalty


def prompt(i: int, words: int) -> str:
    return " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(words)) + f" #{i}"


@dataclass
class Stream:
    ttft: float = 0.0
    total: float = 0.0
    tokens: int = 0
    gaps: list[float] = field(default_factory=list)  # seconds between two updates seen
    error: str = ""


# -- clients --------------------------------------------------------------------------------

def _lines(resp):
    while True:
        line = resp.readline()
        if not line:
            return
        yield line.decode("utf-8", "replace").rstrip("\r\n")


def server_stream(port: int, text: str, new_tokens: int, ignore_eos: bool) -> Stream:
    s, t0 = Stream(), time.perf_counter()
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": new_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": ignore_eos}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    last = None
    for line in _lines(resp):
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        obj = json.loads(line[6:])
        now = time.perf_counter()
        if obj.get("error"):
            s.error = obj["error"]["message"]
        if obj.get("usage"):
            s.tokens = obj["usage"]["completion_tokens"]
        if obj.get("choices") and obj["choices"][0]["delta"].get("content"):
            if not s.ttft:
                s.ttft = now - t0
            elif last is not None:
                s.gaps.append(now - last)
            last = now
    s.total = time.perf_counter() - t0
    conn.close()
    return s


def app_stream(port: int, text: str, new_tokens: int, user: str) -> Stream:
    """Gradio's documented REST API: POST /gradio_api/call/send, then its SSE stream."""
    s, t0 = Stream(), time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/gradio_api/call/send", headers={"Content-Type": "application/json"},
                 body=json.dumps({"data": [text, "", new_tokens, *GREEDY], "session_hash": user}))
    event_id = json.loads(conn.getresponse().read())["event_id"]
    conn.request("GET", f"/gradio_api/call/send/{event_id}")
    resp = conn.getresponse()
    event, last, data = None, None, None
    for line in _lines(resp):
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: ") and event in ("generating", "complete"):
            data = json.loads(line[6:])
            history = data[0] if data else None
            if history and history[-1]["role"] == "assistant" and _text(history[-1]["content"]):
                now = time.perf_counter()
                if not s.ttft:
                    s.ttft = now - t0
                elif event == "generating" and last is not None:
                    s.gaps.append(now - last)
                last = now
        elif line.startswith("data: ") and event == "error":
            s.error = line[6:]
    s.total = time.perf_counter() - t0
    stats = next((x for x in data or [] if isinstance(x, str) and "tokens" in x), "")  # (chat, box, stats)
    if m := re.search(r"(\d+) tokens", stats):
        s.tokens = int(m.group(1))
    conn.close()
    return s


def _text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(c.get("text", "") if isinstance(c, dict) else str(c) for c in content)
    return str(content or "")


def client_process(kind: str, port: int, users: list[int], words: int, new_tokens: int, ignore_eos: bool,
                   start_at: float, out: mp.Queue) -> None:
    """One client process: its share of the users, one thread each, all starting at start_at."""
    results: list = [None] * len(users)

    def one(k: int, i: int) -> None:
        time.sleep(max(0.0, start_at - time.time()))
        try:
            if kind == "server":
                results[k] = server_stream(port, prompt(i, words), new_tokens, ignore_eos)
            else:
                # user i keeps one Gradio session across rounds, as a person keeps the page
                # open: the warm-up round opened it (a new visitor's first message pays for
                # creating Gradio's session state too, ~10 ms of the app's CPU)
                results[k] = app_stream(port, prompt(i, words), new_tokens, f"bench-user-{i}")
        except Exception as exc:  # reported, not hidden
            results[k] = Stream(error=f"{type(exc).__name__}: {exc}")

    cpu0, wall0 = time.process_time(), time.time()
    threads = [threading.Thread(target=one, args=(k, i)) for k, i in enumerate(users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    busy = time.time() - max(wall0, start_at)
    out.put(([asdict(r) for r in results], (time.process_time() - cpu0) / max(busy, 1e-9)))


def run_clients(kind: str, port: int, n: int, procs: int, words: int, new_tokens: int,
                ignore_eos: bool) -> tuple[list[Stream], float, float]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    start_at = time.time() + 2.0  # every client process is up and waiting by then
    shares = [list(range(n))[p::procs] for p in range(min(procs, n))]
    ps = [ctx.Process(target=client_process, args=(kind, port, share, words, new_tokens, ignore_eos, start_at, q))
          for share in shares]
    for p in ps:
        p.start()
    got = [q.get() for _ in ps]
    for p in ps:
        p.join()
    wall = time.time() - start_at
    streams = [Stream(**r) for rs, _ in got for r in rs]
    return streams, wall, max(cpu for _, cpu in got)


# -- the paths --------------------------------------------------------------------------------

def engine_direct(argv: list[str], users: list[int], words: int, new_tokens: int, ignore_eos: bool) -> list[dict]:
    """Runs inside a fresh process: the engine called from n threads, for each n in users."""
    from infer_engine import SamplingParams, create_engine
    from infer_engine.settings import add_engine_arguments, settings_from_args

    p = argparse.ArgumentParser()
    add_engine_arguments(p)
    engine = create_engine(settings_from_args(p.parse_args(argv)))
    sp = SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=ignore_eos)

    def round_(label: str, n: int) -> tuple[list[Stream], float]:
        out: list = [None] * n
        barrier = threading.Barrier(n + 1)

        def one(i: int) -> None:
            s = Stream()
            barrier.wait()
            t0, last = time.perf_counter(), None
            for d in engine.stream_chat([{"role": "user", "content": prompt(i, words)}], sp, f"{label}-{i}"):
                now = time.perf_counter()
                if d.text:
                    if not s.ttft:
                        s.ttft = now - t0
                    elif last is not None:
                        s.gaps.append(now - last)
                    last = now
                if d.usage:
                    s.tokens = d.usage.completion_tokens
            s.total = time.perf_counter() - t0
            out[i] = s

        threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        barrier.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        return out, time.perf_counter() - t0

    results = []
    for n in users:
        round_(f"warmup{n}", n)  # every batch size the measured round uses has run once
        streams, wall = round_(f"bench{n}", n)
        results.append({"users": n, "streams": [asdict(s) for s in streams], "wall": wall})
    engine.close()
    return results


def wait_port(port: int, proc: subprocess.Popen, seconds: float = 900) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the process serving port {port} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"nothing listens on {port} after {seconds:.0f} s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def summarize(path: str, n: int, streams: list[Stream], wall: float, client_cpu: float | None) -> dict:
    bad = [s.error for s in streams if s.error or not s.tokens]
    ok = [s for s in streams if not s.error and s.tokens]
    gaps = sorted(g for s in ok for g in s.gaps)
    return {"path": path, "users": n, "ok": len(ok), "errors": bad[:3],
            "ttft_ms": statistics.mean(s.ttft for s in ok) * 1000 if ok else float("nan"),
            "stream_s": statistics.mean(s.total for s in ok) if ok else float("nan"),
            "total_tps": sum(s.tokens for s in ok) / wall if wall else 0.0,
            "gap_p90_ms": gaps[int(0.9 * (len(gaps) - 1))] * 1000 if gaps else float("nan"),
            "client_cpu": client_cpu}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--users", default="1,16,64", help="numbers of concurrent users, comma-separated")
    ap.add_argument("--paths", default="engine,server,app", help="which of engine, server, app")
    ap.add_argument("--new-tokens", type=int, default=150, help="max new tokens per reply")
    ap.add_argument("--prompt-words", type=int, default=64)
    ap.add_argument("--client-procs", type=int, default=4, help="client processes for server and app")
    ap.add_argument("--app-arg", action="append", default=[], help="extra argument for app.py (repeatable)")
    ap.add_argument("--json", default="", help="also write the results to this file")
    ap.add_argument("--logs", default="", help="folder for the server's and the app's output (default: dropped)")
    ap.add_argument("--_direct", default="", help=argparse.SUPPRESS)
    args, engine_argv = ap.parse_known_args()
    synthetic = "synthetic" in engine_argv
    ignore_eos = not synthetic  # real engines: a fixed length; the synthetic one has its own
    if args._direct:
        users = [int(u) for u in args._direct.split(",")]
        print(json.dumps(engine_direct(engine_argv, users, args.prompt_words, args.new_tokens, ignore_eos)))
        return
    users = [int(u) for u in args.users.split(",")]
    rows: list[dict] = []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "GRADIO_ANALYTICS_ENABLED": "False"}
    for path in args.paths.split(","):
        if path == "engine":
            out = subprocess.run([sys.executable, __file__, "--_direct", args.users, "--new-tokens",
                                  str(args.new_tokens), "--prompt-words", str(args.prompt_words), *engine_argv],
                                 stdout=subprocess.PIPE, text=True, env=env)
            if out.returncode:
                raise SystemExit(f"the engine path failed ({out.returncode})")
            for res in json.loads(out.stdout.strip().splitlines()[-1]):
                rows.append(summarize("engine", res["users"], [Stream(**s) for s in res["streams"]], res["wall"], None))
                print(fmt(rows[-1], rows), flush=True)
            continue
        port = free_port()
        if path == "server":
            cmd = [sys.executable, "-m", "infer_engine.server", "--port", str(port), *engine_argv]
        else:
            cmd = [sys.executable, str(ROOT / "app.py"), "--host", "127.0.0.1", "--port", str(port),
                   "--queue-size", str(max(users) * 2), "--history-path",  # chats kept, as by default
                   str(Path(tempfile.mkdtemp(prefix="bench-chats-")) / "chats.sqlite3"), *args.app_arg, *engine_argv]
        log = open(Path(args.logs) / f"{path}.log", "w") if args.logs else subprocess.DEVNULL
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            wait_port(port, proc)
            for n in users:
                run_clients(path, port, n, args.client_procs, args.prompt_words, args.new_tokens, ignore_eos)  # warm-up
                streams, wall, cpu = run_clients(path, port, n, args.client_procs, args.prompt_words,
                                                 args.new_tokens, ignore_eos)
                rows.append(summarize(path, n, streams, wall, cpu))
                print(fmt(rows[-1], rows), flush=True)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
    print()
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


def fmt(r: dict, rows: list[dict]) -> str:
    base = next((b for b in rows if b["path"] == "engine" and b["users"] == r["users"]), None)
    ratio = ""
    if base and r is not base:
        ratio = (f" | {r['stream_s'] / base['stream_s']:.2f}x stream time, TTFT +{r['ttft_ms'] - base['ttft_ms']:.0f} ms,"
                 f" {r['total_tps'] / base['total_tps']:.2f}x tok/s")
    cpu = "" if r["client_cpu"] is None else f", clients' busiest process {r['client_cpu'] * 100:.0f}% CPU"
    err = f", {len(r['errors'])} errors e.g. {r['errors'][0][:120]!r}" if r["errors"] else ""
    return (f"{r['path']:6s} N={r['users']:<4d} TTFT {r['ttft_ms']:7.0f} ms  stream {r['stream_s']:6.2f} s  "
            f"{r['total_tps']:8.0f} tok/s  update gap p90 {r['gap_p90_ms']:5.0f} ms{cpu}{err}{ratio}")


def table(rows: list[dict]) -> str:
    out = ["| path | users | TTFT ms | stream s | total tok/s | stream vs engine | TTFT vs engine | "
           "tok/s vs engine | update gap p90 | client CPU |", "|" + "---|" * 10]
    for r in rows:
        base = next((b for b in rows if b["path"] == "engine" and b["users"] == r["users"]), None)
        rel = ["", "", ""]
        if base and r is not base:
            rel = [f"{r['stream_s'] / base['stream_s']:.2f}x", f"+{r['ttft_ms'] - base['ttft_ms']:.0f} ms",
                   f"{r['total_tps'] / base['total_tps']:.2f}x"]
        cpu = "" if r["client_cpu"] is None else f"{r['client_cpu'] * 100:.0f}%"
        out.append(f"| {r['path']} | {r['users']} | {r['ttft_ms']:.0f} | {r['stream_s']:.2f} | {r['total_tps']:.0f} | "
                   f"{rel[0]} | {rel[1]} | {rel[2]} | {r['gap_p90_ms']:.0f} ms | {cpu} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
