"""What a person at the public URL gets, next to what the engine can do: the same prompts
answered (a) by the engine called directly, (b) through our OpenAI server, (c) through the
Gradio app as its page does it (`app`: the send event, then the reply through the page's own
stream route, then the reply-done event) and through its documented API (`send`: /send through
Gradio's queue), at several numbers of concurrent users, all in one run. `app/api` and
`send/api`: the app over our server (`--backend api`, the engine in a process of its own).
Clients are plain HTTP (SSE) spread over several processes; their CPU is printed so it is clear
they are not the bottleneck. Each path runs in a fresh process that holds the only copy of the
model. Every measured round starts a fresh conversation, so every path answers the same
prompts: new visitors (`--visitors new`: a fresh Gradio session, the page's load event first)
and returning ones (`returning`: the session of the warm-up round, its chat cleared first).

    # CPU, a synthetic engine that costs what LMDeploy's Python loop costs the app's process
    .venv/bin/python scripts/bench_app.py --backend synthetic --synthetic-tokens-per-s 60 \
        --synthetic-reply-tokens 256 --synthetic-cpu-ms-per-token 0.5 --users 1,64,256 --new-tokens 256
    # a headless Chromium page among 64 plain-HTTP users: its first visible token and update gaps
    .venv/bin/python scripts/bench_app.py ... --paths engine,app --users 64 --browser

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
import asyncio
import http.client
import uuid
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


class GradioSession:
    """One visitor's Gradio session, driven as the page drives it: an event joins Gradio's queue
    (POST queue/join) and its result comes on the session's SSE stream (GET queue/data). Like a
    browser it keeps the cookies the app sets (several app processes keep a visitor on one by its
    cookie) and sends them with every request."""

    def __init__(self, port: int, fns: dict[str, int], session: str):
        self.port, self.fns, self.session = port, fns, session
        self.cookies: dict[str, str] = {}

    def headers(self, extra: dict | None = None) -> dict:
        h = dict(extra or {})
        if self.cookies:
            h["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        return h

    def keep_cookies(self, resp) -> None:
        for value in resp.headers.get_all("Set-Cookie") or []:
            name, _, rest = value.partition("=")
            self.cookies[name.strip()] = rest.split(";")[0].strip()

    def request(self, method: str, path: str, body: str | None = None, headers: dict | None = None):
        """One request on a connection of its own: (connection, response), cookies kept."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        conn.request(method, path, body=body, headers=self.headers(headers))
        resp = conn.getresponse()
        self.keep_cookies(resp)
        return conn, resp

    def open_page(self) -> None:
        """What a browser fetches first: the page (its HTML holds the page's config)."""
        conn, resp = self.request("GET", "/", headers={"Accept": "text/html"})
        resp.read()
        conn.close()
        if resp.status != 200:
            raise RuntimeError(f"GET /: HTTP {resp.status}")

    def call(self, name: str, data: list) -> list:
        conn = None
        try:
            conn, resp = self.request("POST", "/gradio_api/queue/join", headers={"Content-Type": "application/json"},
                                      body=json.dumps({"data": data, "fn_index": self.fns[name], "trigger_id": None,
                                                       "event_data": None, "session_hash": self.session}))
            body = resp.read()
            conn.close()
            if resp.status != 200:
                raise RuntimeError(f"{name}: HTTP {resp.status} {body[:200]!r}")
            event_id = json.loads(body)["event_id"]
            conn, resp = self.request("GET", f"/gradio_api/queue/data?session_hash={self.session}")
            for line in _lines(resp):
                if not line.startswith("data: "):
                    continue
                msg = json.loads(line[6:])
                if msg.get("event_id") == event_id and msg.get("msg") == "process_completed":
                    if not msg.get("success"):
                        raise RuntimeError(f"{name}: {str(msg.get('output'))[:200]}")
                    return msg["output"]["data"]
            raise RuntimeError(f"{name}: the stream ended before the event completed")
        finally:
            if conn is not None:
                conn.close()


def gradio_fns(port: int) -> dict[str, int]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", "/config")
    cfg = json.loads(conn.getresponse().read())
    conn.close()
    return {d["api_name"]: d["id"] for d in cfg["dependencies"] if d.get("api_name")}


def page_stream(port: int, page: GradioSession, text: str, new_tokens: int) -> Stream:
    """Send as the page does it: the send event (it returns the reply's token), the reply from
    the page's stream route, then the reply-done event."""
    s, t0 = Stream(), time.perf_counter()
    out = page.call("page_send", [text, None, "", new_tokens, *GREEDY])
    reader = out[4]
    if not isinstance(reader, str) or "token" not in reader:
        s.error = f"not sent: {str(out[3])[:200]}"
        return s
    token = json.loads(reader)["token"]
    conn, resp = page.request("GET", f"/chat/stream/{token}")
    last, stats = None, ""
    for line in _lines(resp):
        if not line.startswith("data: "):
            continue
        ev = json.loads(line[6:])
        now = time.perf_counter()
        if ev.get("text") or ev.get("add"):
            if not s.ttft:
                s.ttft = now - t0
            elif last is not None and not ev.get("done"):
                s.gaps.append(now - last)
            last = now
        stats = ev.get("stats") or stats
    conn.close()
    s.total = time.perf_counter() - t0
    if resp.status != 200:
        s.error = f"stream: HTTP {resp.status}"
    page.call("page_reply_done", [json.dumps({"kind": "update", "token": token}), None])
    if m := re.search(r"(\d+) tokens", stats):
        s.tokens = int(m.group(1))
    return s


def send_stream(page: GradioSession, text: str, new_tokens: int, user: str) -> Stream:
    """Gradio's documented REST API: POST /gradio_api/call/send, then its SSE stream."""
    s, t0 = Stream(), time.perf_counter()
    conn, resp = page.request("POST", "/gradio_api/call/send", headers={"Content-Type": "application/json"},
                              body=json.dumps({"data": [text, "", new_tokens, *GREEDY], "session_hash": user}))
    event_id = json.loads(resp.read())["event_id"]
    conn.close()
    conn, resp = page.request("GET", f"/gradio_api/call/send/{event_id}")
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
                   start_at: float, tag: str, visitors: str, cookies: dict, out: mp.Queue) -> None:
    """One client process: its share of the users, one thread each, all starting at start_at.
    Before it, each user's conversation is made fresh: a new visitor opens a new Gradio session
    (the page's load event, as a browser does), a returning one clears its chat."""
    results: list = [None] * len(users)
    kept: dict[int, dict] = {}
    base = path_base(kind)
    fns = gradio_fns(port) if base in ("app", "send") else {}

    def one(k: int, i: int) -> None:
        try:
            session = f"{tag}-{i}-{uuid.uuid4().hex[:8]}" if visitors == "new" else f"user-{i}"
            page = GradioSession(port, fns, session)
            if base == "app":
                if visitors == "returning":  # its browser kept the cookies of its first visit
                    page.cookies = dict(cookies.get(i, {}))
                if visitors == "new" or not page.cookies:
                    page.open_page()
                if visitors == "new":
                    page.call("page_load", [])
                else:
                    page.call("clear", [None])
                kept[i] = page.cookies
            elif base == "send" and visitors == "returning":
                page.call("clear", [None])
            time.sleep(max(0.0, start_at - time.time()))
            if base == "server":
                results[k] = server_stream(port, prompt(i, words), new_tokens, ignore_eos)
            elif base == "app":
                results[k] = page_stream(port, page, prompt(i, words), new_tokens)
            else:
                results[k] = send_stream(page, prompt(i, words), new_tokens, session)
        except Exception as exc:  # reported, not hidden
            results[k] = Stream(error=f"{type(exc).__name__}: {exc}")

    cpu0, wall0 = time.process_time(), time.time()
    threads = [threading.Thread(target=one, args=(k, i)) for k, i in enumerate(users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    busy = time.time() - max(wall0, start_at)
    out.put(([asdict(r) for r in results], (time.process_time() - cpu0) / max(busy, 1e-9), kept))


def run_clients(kind: str, port: int, n: int, procs: int, words: int, new_tokens: int, ignore_eos: bool,
                tag: str = "m", visitors: str = "new", browser: "BrowserPage | None" = None,
                cookies: dict | None = None) -> tuple[list[Stream], float, float]:
    """One round of n users; `cookies` (user -> its cookies) is what the returning visitors'
    browsers kept, updated with what this round's visitors were given."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    cookies = {} if cookies is None else cookies
    start_at = time.time() + 3.0 + 0.03 * n  # every client process is up, every user prepared
    if browser is not None:
        browser.start(start_at)
    shares = [list(range(n))[p::procs] for p in range(min(procs, n))]
    ps = [ctx.Process(target=client_process, args=(kind, port, share, words, new_tokens, ignore_eos, start_at,
                                                   tag, visitors, {i: cookies.get(i, {}) for i in share}, q))
          for share in shares]
    for p in ps:
        p.start()
    got = [q.get() for _ in ps]
    for p in ps:
        p.join()
    if browser is not None:
        browser.join()
    for _, _, kept in got:
        cookies.update(kept)
    streams = [Stream(**r) for rs, _, _ in got for r in rs]
    wall = max([s.total for s in streams], default=0.0) or 1e-9  # the common start to the last reply's end
    return streams, wall, max(cpu for _, cpu, _ in got)


# -- the paths --------------------------------------------------------------------------------

def engine_direct(argv: list[str], users: list[int], words: int, new_tokens: int, ignore_eos: bool) -> list[dict]:
    """Runs inside a fresh process: the engine's n streams read from one event loop, as our
    server reads them, for each n in users."""
    from infer_engine import SamplingParams, create_engine
    from infer_engine.aio import ThreadedStream
    from infer_engine.settings import add_engine_arguments, settings_from_args

    p = argparse.ArgumentParser()
    add_engine_arguments(p)
    engine = create_engine(settings_from_args(p.parse_args(argv)))
    sp = SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=ignore_eos)

    async def one(label: str, i: int) -> Stream:
        """A stream read from asyncio, as our server reads it (each on a thread of its own)."""
        s, t0, last = Stream(), time.perf_counter(), None
        stream = ThreadedStream(lambda: engine.stream_chat([{"role": "user", "content": prompt(i, words)}], sp,
                                                           f"{label}-{i}"))
        while items := await stream.take():
            now = time.perf_counter()
            for d in items:
                if d.text:
                    if not s.ttft:
                        s.ttft = now - t0
                    elif last is not None:
                        s.gaps.append(now - last)
                    last = now
                if d.usage:
                    s.tokens = d.usage.completion_tokens
        s.total = time.perf_counter() - t0
        return s

    async def round_(label: str, n: int) -> tuple[list[Stream], float]:
        t0 = time.perf_counter()
        out = await asyncio.gather(*(one(label, i) for i in range(n)))
        return list(out), time.perf_counter() - t0

    results = []
    for n in users:
        asyncio.run(round_(f"warmup{n}", n))  # every batch size the measured round uses has run once
        streams, wall = asyncio.run(round_(f"bench{n}", n))
        results.append({"users": n, "streams": [asdict(s) for s in streams], "wall": wall})
    engine.close()
    return results


def path_base(path: str) -> str:
    """engine | server | app | send, of a path such as app@4 or send/api."""
    return path.split("/")[0].split("@")[0]


def path_workers(path: str) -> int:
    """app@4: the app as 4 processes behind one port (--workers 4); else one."""
    spec = path.split("/")[0]
    return int(spec.split("@")[1]) if "@" in spec else 1


def wait_port(port: int, proc: subprocess.Popen, seconds: float = 900, page: bool = False) -> None:
    """Until the port accepts connections (`page`: until it answers GET / with 200, as an app of
    several processes does only once they are all up)."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the process serving port {port} exited with {proc.returncode}")
        try:
            if page:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/")
                ok = conn.getresponse().status == 200
                conn.close()
                if ok:
                    return
            else:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"nothing answers on {port} after {seconds:.0f} s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def summarize(path: str, n: int, streams: list[Stream], wall: float, client_cpu: float | None,
              browser: dict | None = None) -> dict:
    bad = [s.error for s in streams if s.error or not s.tokens]
    ok = [s for s in streams if not s.error and s.tokens]
    gaps = sorted(g for s in ok for g in s.gaps)
    return {"path": path, "users": n, "ok": len(ok), "errors": bad[:3],
            "ttft_ms": statistics.mean(s.ttft for s in ok) * 1000 if ok else float("nan"),
            "stream_s": statistics.mean(s.total for s in ok) if ok else float("nan"),
            "total_tps": sum(s.tokens for s in ok) / wall if wall else 0.0,
            "gap_p90_ms": gaps[int(0.9 * (len(gaps) - 1))] * 1000 if gaps else float("nan"),
            "client_cpu": client_cpu, "browser": browser}


def start_process(name: str, cmd: list[str], env: dict, args: argparse.Namespace, port: int,
                  profile: bool = False, page: bool = False) -> subprocess.Popen:
    """A server or app process, in a session of its own; with `profile`, under py-spy (samples of
    the threads holding the GIL, its child processes' too, written as collapsed stacks when it is
    stopped)."""
    if profile:
        out = Path(args.profile) / f"{name.replace('/', '-').replace('@', '-w')}.stacks"
        cmd = ["py-spy", "record", "--gil", "--subprocesses", "--nonblocking", "--rate", "200", "--format",
               "raw", "--output", str(out), "--", *cmd]
    log = open(Path(args.logs) / f"{name.replace('/', '-').replace('@', '-w')}.log", "w") if args.logs else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    proc.profile = out if profile else None
    wait_port(port, proc, page=page)
    return proc


def stop_process(proc: subprocess.Popen) -> None:
    if proc.profile is not None and proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # py-spy writes its samples, then ends
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)
    if proc.profile is not None and proc.profile.exists():
        summary = profile_summary(proc.profile)
        proc.profile.with_suffix(".summary.txt").write_text(summary)
        print(f"\nprofile of {proc.profile.stem} (py-spy, GIL held):\n{summary}", flush=True)


# what a sample's stack says it is doing, first match wins (the app's process)
PROFILE_PARTS = [
    ("start-up (model load, imports)", ("create_engine", "from_pretrained", "_find_and_load", "build_model")),
    ("LMDeploy's engine loop (in process)", ("lmdeploy/",)),
    ("synthetic engine's per-token work", ("synthetic_backend.py",)),
    ("openai client (SSE chunk parsing)", ("openai/", "httpx", "httpcore")),
    ("detokenising, stop strings (Engine protocol)", ("infer_engine/base.py", "tokenizers", "transformers/")),
    ("Gradio new session state (a new visitor)", ("SessionState", "config_for_block", "get_config")),
    ("Gradio queue and events", ("gradio/queueing.py", "gradio/blocks.py", "gradio/route_utils.py",
                                 "gradio/utils.py", "gradio/processing_utils.py", "gradio/components/")),
    ("the page's stream route", ("chat_ui/stream.py",)),
    ("conversation service, store", ("chat_ui/",)),
    ("HTTP server (uvicorn, starlette, SSE)", ("uvicorn", "starlette", "sse_starlette", "h11", "httptools")),
    ("asyncio event loop", ("asyncio/",)),
]


def profile_summary(path: Path) -> str:
    """Shares of py-spy's collapsed stacks by what they are doing, start-up left out."""
    parts: dict[str, int] = {}
    leaves: dict[str, int] = {}
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        part = next((name for name, keys in PROFILE_PARTS if any(k in stack for k in keys)), "other")
        parts[part] = parts.get(part, 0) + n
        if not part.startswith("start-up"):
            leaf = stack.split(";")[-1]
            leaves[leaf] = leaves.get(leaf, 0) + n
    serving = sum(n for p, n in parts.items() if not p.startswith("start-up")) or 1
    out = [f"{n / serving * 100:5.1f} %  {p}" for p, n in sorted(parts.items(), key=lambda x: -x[1])
           if not p.startswith("start-up")]
    out.append(f"({serving} samples while serving; start-up: {parts.get(PROFILE_PARTS[0][0], 0)})")
    out.append("top frames:")
    out += [f"{n / serving * 100:5.1f} %  {leaf[:150]}" for leaf, n in sorted(leaves.items(), key=lambda x: -x[1])[:12]]
    return "\n".join(out)


class BrowserPage:
    """One headless Chromium page at the app, sending at the round's start like the plain-HTTP
    users: its time from Enter to the first visible token, and the gaps between updates it shows."""

    def __init__(self, port: int):
        self.port, self.result, self._thread = port, None, None

    def start(self, start_at: float) -> None:
        self._thread = threading.Thread(target=self._run, args=(start_at,), daemon=True)
        self._thread.start()

    def join(self) -> None:
        self._thread.join(timeout=600)

    def _run(self, start_at: float) -> None:
        from playwright.sync_api import sync_playwright
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=os.environ.get("CHROMIUM", "/usr/bin/chromium"),
                                            args=["--no-sandbox", "--disable-gpu"])
                page = browser.new_page(viewport={"width": 1100, "height": 900})
                page.goto(f"http://127.0.0.1:{self.port}/")
                page.locator("#input textarea").fill("Tell me about the river and the mountain, please.")
                page.wait_for_function("() => !!document.querySelector('#chatbot')")
                time.sleep(max(0.0, start_at - time.time()))
                page.evaluate("""() => { const t0 = performance.now(), times = []; let n0 = 0;
                  new MutationObserver(() => { const b = [...document.querySelectorAll('#chatbot [data-testid="bot"]')].pop();
                    const n = b ? b.innerText.length : 0; if (n && n !== n0) { times.push(performance.now() - t0); n0 = n; } })
                    .observe(document.querySelector('#chatbot'), {subtree: true, childList: true, characterData: true});
                  window.__bench = {times}; }""")
                page.locator("#input textarea").press("Enter")
                page.wait_for_function("() => /\\d+ tokens/.test(document.querySelector('#stats').innerText)",
                                       timeout=600_000)
                times = page.evaluate("() => window.__bench.times")
                browser.close()
            gaps = sorted(b - a for a, b in zip(times, times[1:]))
            self.result = {"ttft_ms": times[0] if times else float("nan"), "updates": len(times),
                           "gap_p90_ms": gaps[int(0.9 * (len(gaps) - 1))] if gaps else float("nan")}
        except Exception as exc:  # reported, not hidden
            self.result = {"error": f"{type(exc).__name__}: {exc}"[:300]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--users", default="1,16,64", help="numbers of concurrent users, comma-separated")
    ap.add_argument("--paths", default="engine,server,app,send",
                    help="which of engine, server, app, send, app/api, send/api; app@N, send@N: the app as N "
                         "processes behind one port (--workers N: the engine in a process of its own)")
    ap.add_argument("--new-tokens", type=int, default=150, help="max new tokens per reply")
    ap.add_argument("--prompt-words", type=int, default=64)
    ap.add_argument("--client-procs", type=int, default=4, help="client processes for server and app")
    ap.add_argument("--app-arg", action="append", default=[], help="extra argument for app.py (repeatable)")
    ap.add_argument("--json", default="", help="also write the results to this file")
    ap.add_argument("--logs", default="", help="folder for the server's and the app's output (default: dropped)")
    ap.add_argument("--visitors", default="new,returning",
                    help="app paths: new (a fresh Gradio session each round) and/or returning (the same, chat cleared)")
    ap.add_argument("--browser", action="store_true",
                    help="app paths: one headless Chromium page sends too (Debian's chromium + playwright)")
    ap.add_argument("--profile", default="", help="folder: py-spy samples of the app's process (GIL held), "
                                                  "collapsed stacks and a summary per path")
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
    if args.logs:
        Path(args.logs).mkdir(parents=True, exist_ok=True)
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    visitor_kinds = [v for v in args.visitors.split(",") if v]
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
        procs = []
        try:
            port, app_engine_argv = free_port(), engine_argv
            base, workers = path_base(path), path_workers(path)
            if path.endswith("/api"):  # the app over our server: the engine in a process of its own
                sport = free_port()
                procs.append(start_process("server", [sys.executable, "-m", "infer_engine.server", "--port",
                                                      str(sport), *engine_argv], env, args, sport))
                app_engine_argv = ["--backend", "api", "--api-base-url", f"http://127.0.0.1:{sport}/v1"]
            if path == "server":
                cmd = [sys.executable, "-m", "infer_engine.server", "--port", str(port), *engine_argv]
            else:
                cmd = [sys.executable, str(ROOT / "app.py"), "--host", "127.0.0.1", "--port", str(port),
                       "--queue-size", str(max(users) * 2), "--history-path",  # chats kept, as by default
                       str(Path(tempfile.mkdtemp(prefix="bench-chats-")) / "chats.sqlite3"),
                       "--workers", str(workers), *args.app_arg, *app_engine_argv]
            procs.append(start_process(path, cmd, env, args, port, profile=args.profile and path != "server",
                                       page=base != "server"))
            for n in users:
                for visitors in (visitor_kinds if path != "server" else ["new"]):
                    cookies: dict = {}  # what the returning visitors' browsers keep
                    run_clients(path, port, n, args.client_procs, args.prompt_words, args.new_tokens, ignore_eos,
                                "warm", visitors, cookies=cookies)
                    browser = None
                    if args.browser and base == "app":
                        browser = BrowserPage(port)
                    streams, wall, cpu = run_clients(path, port, n, args.client_procs, args.prompt_words,
                                                     args.new_tokens, ignore_eos, "m", visitors, browser, cookies)
                    label = path if path == "server" else f"{path} {visitors}"
                    rows.append(summarize(label, n, streams, wall, cpu, browser.result if browser else None))
                    print(fmt(rows[-1], rows), flush=True)
        finally:
            for proc in reversed(procs):
                stop_process(proc)
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
    b = r.get("browser")
    if b:
        err += (f" | Chromium page: first token {b['ttft_ms']:.0f} ms, update gap p90 {b['gap_p90_ms']:.0f} ms, "
                f"{b['updates']} updates" if "error" not in b else f" | Chromium page failed: {b['error']}")
    return (f"{r['path']:18s} N={r['users']:<4d} TTFT {r['ttft_ms']:7.0f} ms  stream {r['stream_s']:6.2f} s  "
            f"{r['total_tps']:8.0f} tok/s  update gap p90 {r['gap_p90_ms']:5.0f} ms{cpu}{err}{ratio}")


def table(rows: list[dict]) -> str:
    out = ["| path | users | TTFT ms | stream s | total tok/s | stream vs engine | TTFT vs engine | "
           "tok/s vs engine | update gap p90 | client CPU | Chromium page: first token, gap p90 |", "|" + "---|" * 11]
    for r in rows:
        base = next((b for b in rows if b["path"] == "engine" and b["users"] == r["users"]), None)
        rel = ["", "", ""]
        if base and r is not base:
            rel = [f"{r['stream_s'] / base['stream_s']:.2f}x", f"+{r['ttft_ms'] - base['ttft_ms']:.0f} ms",
                   f"{r['total_tps'] / base['total_tps']:.2f}x"]
        cpu = "" if r["client_cpu"] is None else f"{r['client_cpu'] * 100:.0f}%"
        b = r.get("browser") or {}
        page = f"{b['ttft_ms']:.0f} ms, {b['gap_p90_ms']:.0f} ms" if "ttft_ms" in b else b.get("error", "")[:40]
        out.append(f"| {r['path']} | {r['users']} | {r['ttft_ms']:.0f} | {r['stream_s']:.2f} | {r['total_tps']:.0f} | "
                   f"{rel[0]} | {rel[1]} | {rel[2]} | {r['gap_p90_ms']:.0f} ms | {cpu} | {page} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
