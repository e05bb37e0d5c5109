"""One command for a scaled-out deployment on one host: LMDeploy's request router, N replicas
of our OpenAI server (one per GPU, or per group of GPUs with tensor parallelism) registered
with it, and the chat app pointed at it.

    python scripts/launch_replicas.py --model-path ./merged --backend pytorch --gpus 0 1
    python scripts/launch_replicas.py --model-path ./merged --backend pytorch --gpus 0,1 2,3 -- --lmdeploy-tp 2
    python scripts/launch_replicas.py --backend synthetic --replicas 2      # no model: a dry run

Each GPU group (`--gpus`, CUDA_VISIBLE_DEVICES of one replica) gets one replica; arguments
after `--` go to every replica (engine flags: `--lmdeploy-tp`, `--session-len`, ...). The app
flags and the proxy's options are APP_* / environment settings as usual. A replica that dies
is started again (it registers anew; the proxy's heartbeat has dropped the dead one); if the
proxy or the app dies, everything stops. Ctrl-C or SIGTERM stops all of it. Logs: --log-dir.

Across several hosts: run the proxy once, and on each host `python -m infer_engine.server
--proxy-url http://PROXY:PORT --host 0.0.0.0 --public-url http://THIS_HOST:PORT ...`.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


class Child:
    def __init__(self, name: str, cmd: list[str], log_dir: Path, env: dict | None = None):
        self.name, self.cmd, self.env, self.log_path = name, cmd, env, log_dir / f"{name}.log"
        self.proc: subprocess.Popen | None = None
        self.restarts = 0

    def start(self) -> None:
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                     env=dict(os.environ, **(self.env or {})), start_new_session=True)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGINT)  # a replica leaves the proxy on the way out

    def wait(self, timeout: float = 30) -> None:
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def last_line(self) -> str:
        """The last line its log has (where a replica says why it stopped)."""
        try:
            lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return ""
        return lines[-1].strip()[-300:] if lines else ""


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no obstacle
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def wait_for(check, what: str, children: list[Child], timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for c in children:
            if not c.alive():
                why = c.last_line()
                raise SystemExit(f"error: {c.name} exited with {c.proc.returncode} while starting"
                                 + (f": {why}" if why else "") + f" (log {c.log_path})")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.25)
    raise SystemExit(f"error: timed out after {timeout:.0f} s waiting for {what}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-path", default="", help="the model every replica serves")
    p.add_argument("--backend", default="pytorch", help="engine backend of the replicas (pytorch, turbomind, "
                   "transformers, synthetic)")
    p.add_argument("--served-model-name", default="", help="model id behind the proxy (default: folder name)")
    p.add_argument("--replicas", type=int, default=0, help="replica count (default: one per --gpus group, or 2)")
    p.add_argument("--gpus", nargs="*", default=[], metavar="IDS",
                   help="CUDA_VISIBLE_DEVICES of each replica: '0 1' (two replicas), '0,1 2,3' (two with TP 2)")
    p.add_argument("--host", default="127.0.0.1", help="where the app listens (0.0.0.0: every interface, for "
                   "visitors from other machines; replicas always listen on 127.0.0.1)")
    p.add_argument("--proxy-host", default="127.0.0.1", help="where LMDeploy's proxy listens: keep it on loopback "
                   "unless replicas on other hosts register with it; its /nodes/add and /nodes/remove take no key, so "
                   "anyone who reaches it can add a rogue node or remove real ones")
    p.add_argument("--proxy-port", type=int, default=8000)
    p.add_argument("--base-port", type=int, default=23334, help="replica i listens on base-port + i")
    p.add_argument("--app-port", type=int, default=7860)
    p.add_argument("--no-app", action="store_true", help="the proxy and the replicas only")
    p.add_argument("--routing", default="min_expected_latency",
                   choices=["min_expected_latency", "min_observed_latency", "random"])
    p.add_argument("--log-dir", default="logs/replicas")
    p.add_argument("--start-timeout", type=float, default=900, help="seconds a replica may take to load")
    a = p.parse_args(argv)
    replicas = a.replicas or len(a.gpus) or 2
    if a.gpus and len(a.gpus) != replicas:
        p.error(f"--gpus gives {len(a.gpus)} groups for {replicas} replicas")
    if a.backend != "synthetic" and not a.model_path:
        p.error("--model-path is required (or --backend synthetic)")
    name = a.served_model_name or (Path(a.model_path).name if a.model_path else "synthetic")
    log_dir = Path(a.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    local = "127.0.0.1" if a.host in ("0.0.0.0", "::") else a.host
    proxy_local = "127.0.0.1" if a.proxy_host in ("0.0.0.0", "::") else a.proxy_host
    proxy_url = f"http://{proxy_local}:{a.proxy_port}"

    proxy = Child("proxy", [sys.executable, "-m", "lmdeploy.serve.proxy.proxy", "--server_name", a.proxy_host,
                            "--server_port", str(a.proxy_port), "--routing_strategy", a.routing,
                            "--disable_cache_status", "True"], log_dir)
    nodes = []
    for i in range(replicas):
        port = a.base_port + i
        cmd = [sys.executable, "-m", "infer_engine.server", "--backend", a.backend, "--host", "127.0.0.1",
               "--port", str(port), "--served-model-name", name, "--proxy-url", proxy_url]
        cmd += (["--model-path", a.model_path] if a.model_path else []) + extra
        env = {"CUDA_VISIBLE_DEVICES": a.gpus[i]} if a.gpus else None
        nodes.append((f"http://127.0.0.1:{port}", Child(f"replica-{i}", cmd, log_dir, env)))
    app = None if a.no_app else Child("app", [
        sys.executable, "app.py", "--backend", "api", "--api-base-url", f"{proxy_url}/v1", "--api-model", name,
        "--host", a.host, "--port", str(a.app_port)], log_dir)
    everyone = [proxy] + [c for _, c in nodes] + ([app] if app else [])
    ports = [(a.proxy_host, a.proxy_port, "the proxy", "--proxy-port")]
    ports += [("127.0.0.1", a.base_port + i, f"replica-{i}", "--base-port") for i in range(replicas)]
    ports += [(a.host, a.app_port, "the app", "--app-port")] if app else []
    for host, port, who, flag in ports:  # before anything starts: a clear line, not a child dying later
        if port_in_use(host, port):
            p.error(f"port {port} ({who}) is in use on {host}: stop what listens there or choose another {flag}")

    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        proxy.start()
        wait_for(lambda: get_json(proxy_url + "/nodes/status") is not None, "the proxy", [proxy], 120)
        for _, c in nodes:
            c.start()
        wait_for(lambda: set(get_json(proxy_url + "/nodes/status")) >= {u for u, _ in nodes},
                 f"{replicas} replicas to register", [proxy] + [c for _, c in nodes], a.start_timeout)
        if app:
            app.start()
            wait_for(lambda: urllib.request.urlopen(f"http://{local}:{a.app_port}/", timeout=5).status == 200,
                     "the app", everyone, 300)
        print(f"ready: proxy {proxy_url} ({replicas} replicas of {name}: "
              + ", ".join(u for u, _ in nodes) + ")" + (f", app http://{local}:{a.app_port}/" if app else ""),
              flush=True)
        while not stopping:
            time.sleep(0.5)
            for url, c in nodes:
                if not c.alive() and not stopping:
                    c.restarts += 1
                    print(f"{c.name} ({url}) exited with {c.proc.returncode}: starting it again "
                          f"(restart {c.restarts}; its last line: {c.last_line()!r}; log {c.log_path})", flush=True)
                    c.start()
            for c in [proxy] + ([app] if app else []):
                if not c.alive() and not stopping:
                    print(f"error: {c.name} exited with {c.proc.returncode}: {c.last_line()!r} (log {c.log_path}); "
                          "stopping", flush=True)
                    return 1
        return 0
    finally:
        for c in reversed(everyone):  # the app first, the proxy last: replicas can still leave it
            c.stop()
            if c is not proxy:
                c.wait()
        proxy.stop()
        proxy.wait()
        print("stopped", flush=True)


if __name__ == "__main__":
    sys.exit(main())
