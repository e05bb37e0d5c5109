"""What one hostile request costs everyone else: our OpenAI server (a separate process, the tiny
model on the CPU) gets each attack while another client sends a 10-token request; it prints
the attack's status and time, how much longer the other client waited than it does alone, and
the server's peak memory (RSS, polled every 10 ms) over its idle memory.

    .venv/bin/python scripts/bench_hostile.py [--model-path models/tiny-chat]
    # the same attacks against another checkout (e.g. the code before a change):
    .venv/bin/python scripts/bench_hostile.py --server-root /tmp/old-checkout

Attacks: a 20 MB message, an 800-turn conversation (short turns, far over the context), 16 stop
strings of 30,000 characters, and the longest stop strings still accepted (16 of 256) on a
400-token reply, next to the same reply without stop strings (the transformers backend runs one
generation at a time, so the other client waits for that reply either way).
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, body: bytes, timeout: float = 600) -> tuple[int, float]:
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        return resp.status, time.perf_counter() - t0
    except (ConnectionError, OSError) as exc:
        print(f"  ({type(exc).__name__}: {exc})")
        return 0, time.perf_counter() - t0
    finally:
        conn.close()


def victim_body() -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10,
                       "ignore_eos": True, "temperature": 0}).encode()


def attacks() -> dict[str, bytes]:
    turns = []
    for i in range(800):
        turns += [{"role": "user", "content": f"hello number {i}, how are you?"},
                  {"role": "assistant", "content": "fine, thanks"}]
    turns.append({"role": "user", "content": "and now?"})
    hi = [{"role": "user", "content": "hi"}]
    return {
        "20 MB message": json.dumps({"messages": [{"role": "user", "content": "x" * (20 * 2**20)}]}).encode(),
        "800-turn conversation": json.dumps({"messages": turns, "max_tokens": 16}).encode(),
        "16 stop strings x 30,000 chars": json.dumps({"messages": hi, "max_tokens": 64, "ignore_eos": True,
                                                      "stop": ["a" * 29_999 + chr(98 + i) for i in range(16)]}
                                                     ).encode(),
        "400 tokens, no stop strings (reference)": json.dumps(
            {"messages": hi, "max_tokens": 400, "ignore_eos": True, "temperature": 0}).encode(),
        "16 stop strings x 256 chars, 400 tokens": json.dumps(
            {"messages": hi, "max_tokens": 400, "ignore_eos": True, "temperature": 0,
             "stop": ["a" * 255 + chr(98 + i) for i in range(16)]}).encode(),
    }


class PeakRss:
    def __init__(self, pid: int):
        self.proc, self.peak, self.done = psutil.Process(pid), 0, threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self.done.is_set():
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.01)

    def __enter__(self) -> "PeakRss":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-path", default=str(ROOT / "models" / "tiny-chat"))
    p.add_argument("--server-root", default=str(ROOT), help="checkout whose infer_engine.server runs")
    args = p.parse_args()
    if not Path(args.model_path).exists():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "build_tiny_model.py"), "--out", args.model_path],
                       check=True)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "infer_engine.server", "--model-path", args.model_path,
                               "--port", str(port)], cwd=args.server_root,
                              env={**os.environ, "PYTHONPATH": args.server_root},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    sys.exit("the server did not start")
                time.sleep(0.2)
        for _ in range(3):
            post(port, victim_body())  # warm up
        alone = sorted(post(port, victim_body())[1] for _ in range(5))[2]
        idle = psutil.Process(server.pid).memory_info().rss
        print(f"server: {args.server_root}; a 10-token request alone: {alone * 1000:.0f} ms; "
              f"idle RSS {idle / 2**20:.0f} MB\n")
        print(f"{'attack':42s} {'status':>6s} {'attack s':>9s} {'other waited s':>15s} {'peak RSS MB':>12s}")
        for name, body in attacks().items():
            result: dict = {}
            with PeakRss(server.pid) as rss:
                t = threading.Thread(target=lambda b=body, r=result: r.update(attack=post(port, b)))
                t.start()
                time.sleep(0.05)  # the attack is in flight
                _, victim = post(port, victim_body())
                t.join()
            status, took = result["attack"]
            print(f"{name:42s} {status:6d} {took:9.2f} {max(0.0, victim - alone):15.2f} "
                  f"{rss.peak / 2**20:7.0f} (+{(rss.peak - idle) / 2**20:.0f})")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
