"""Several app processes on one port (`--workers N`), for what one Gradio process cannot serve.

A Gradio process spends ~4 ms of CPU on each queued event and more on each new visitor's session,
and shares one GIL with whatever else runs in it (an engine's own Python loop, when the model runs
in the app's process). With more than one worker the app runs as:

    app.py, this supervisor: the router on HOST:PORT (chat_ui/router.py: each visitor kept on one worker)
      ├─ the model server: python -m infer_engine.server on 127.0.0.1 (the engine in a process of its own)
      ├─ the Compare tab's model server, if there is one
      └─ N workers: app.py on 127.0.0.1, each over those servers, all on one chat store

A worker's engine is the api backend with the model's own tokenizer: conversations are fitted and
an over-long message is refused before it is sent, as in one process, and user text goes as it is
(the server keeps it from becoming control tokens itself). The servers take a random API key, so
nothing else on the machine can use them. A child that dies is started again (its visitors reload
the page); one that cannot start stops the app with a line naming it. Ctrl-C or SIGTERM stop all.
With `--backend api` (the model is remote already) only the workers run.
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable

from infer_engine.architectures import is_vision_model
from infer_engine.server import ServerSettings, free_port
from infer_engine.settings import ApiSettings, EngineSettings, dataclass_env
from infer_engine.sources import resolve_model

from .router import Router, Worker
from .settings import ENV_PREFIX as APP_PREFIX
from .settings import AppSettings, compare_engine_settings

ROOT = Path(__file__).resolve().parents[1]
WORKER_ENV = "CHAT_APP_WORKER"  # a worker's index, set by the supervisor (the worker sets its cookie to it)
SERVER_START_S = 1800.0         # a model server may take this long to load (a 7B model, CUDA graphs)
WORKER_START_S = 300.0
GPU_ENGINES = ("pytorch", "turbomind")
# the model server sends a reply's text to its worker at most this often: a page shows at most
# 20 updates a second anyway, and each chunk costs both processes (JSON, HTTP, the openai client)
STREAM_INTERVAL_MS = 20.0


def worker_index() -> int | None:
    value = os.environ.get(WORKER_ENV, "")
    return int(value) if value.isdigit() else None


def worker_count(app: AppSettings, engine: EngineSettings) -> int:
    """--workers, or auto: several when the model runs on a GPU (min(4, CPUs / 2)), else one."""
    if app.workers:
        return app.workers
    on_gpu = engine.backend in GPU_ENGINES
    if engine.backend == "transformers" and (engine.device in ("auto", "cuda") or engine.device.startswith("cuda:")):
        try:
            import torch
            on_gpu = torch.cuda.is_available()
        except ImportError:
            pass
    return max(1, min(4, (os.cpu_count() or 2) // 2)) if on_gpu else 1


class StartFailed(Exception):
    def __init__(self, name: str, code: int | None, why: str = ""):
        super().__init__(f"{name} " + (f"exited with {code} while starting (its own error is above)"
                                       if code is not None else why))
        self.code = code


class Child:
    """One process of the app: started, checked until `ready()`, started again when it dies."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], ready: Callable[[], bool],
                 start_s: float, worker: Worker | None = None):
        self.name, self.cmd, self.env, self.ready, self.start_s, self.worker = name, cmd, env, ready, start_s, worker
        self.proc: subprocess.Popen | None = None
        self.restarts = 0

    def start(self) -> None:
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env={**os.environ, **self.env}, start_new_session=True,
                                     preexec_fn=_die_with_parent)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise StartFailed(self.name, self.proc.returncode if self.proc else None)
            if await asyncio.to_thread(_answers, self.ready):
                if self.worker is not None:
                    self.worker.up = True
                return
            await asyncio.sleep(0.25)
        raise StartFailed(self.name, None, f"did not answer within {self.start_s:.0f} s")

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.up = False
        if self.alive():
            self.proc.terminate()

    def wait(self, timeout: float = 30.0) -> None:
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _die_with_parent() -> None:
    """In the child: it gets SIGTERM when the supervisor dies, however it dies (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _answers(check: Callable[[], bool]) -> bool:
    try:
        return check()
    except OSError:
        return False


def _http_ok(url: str) -> Callable[[], bool]:
    def check() -> bool:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status == 200
    return check


def _model_server(name: str, settings: EngineSettings, served: str, key: str, images: bool) -> tuple[Child, str]:
    """A model server child for `settings` (a local model) and the base URL the workers use."""
    port = free_port()
    server = ServerSettings(host="127.0.0.1", port=port, api_key=key, served_model_name=served,
                            max_body_mb=64.0 if images else 8.0,  # a chat's kept images travel as data URLs
                            stream_interval_ms=STREAM_INTERVAL_MS,
                            client_share=100_000)  # its one client is the app, which bounds its own visitors
    env = {**dataclass_env(settings, "ENGINE_"), **dataclass_env(server, "SERVER_")}
    child = Child(name, [sys.executable, "-m", "infer_engine.server"], env,
                  _http_ok(f"http://127.0.0.1:{port}/health"), SERVER_START_S)
    return child, f"http://127.0.0.1:{port}/v1"


def _local(settings: EngineSettings) -> tuple[EngineSettings, str, bool]:
    """The settings with the model fetched to a local folder (hub models download here, once, with
    their errors said here), the name it is served under, and whether it takes images."""
    if settings.backend == "synthetic":
        return settings, settings.synthetic.model_name, settings.synthetic.accepts_images
    path = resolve_model(settings.model_path, settings.model_source, settings.cache_dir)
    return dataclasses.replace(settings, model_path=path), Path(path).name or path, is_vision_model(path)


def plan(app: AppSettings, engine: EngineSettings, n: int) -> tuple[list[Child], list[Child], Router]:
    """The model servers and the workers (not started) and the router in front of the workers."""
    key = secrets.token_urlsafe(24)
    servers: list[Child] = []
    worker_app = dataclasses.replace(app, host="127.0.0.1", workers=1)
    worker_engine = engine
    if engine.backend != "api":
        compare = compare_engine_settings(app, engine)  # (two LMDeploy engines on one GPU: half the cache each)
        local, served, images = _local(engine)
        child, url = _model_server("the model server", local, served, key, images)
        servers.append(child)
        worker_engine = dataclasses.replace(local, backend="api", api=ApiSettings(
            base_url=url, api_key=key, model=served, timeout=600.0, max_retries=3, escape_control_tokens=False,
            images=images, tokenizer="" if local.backend == "synthetic" else local.model_path))
        if compare is not None:
            local_c, name_c, images_c = _local(compare)
            served_c = name_c if name_c != served else f"{name_c}-compare"  # one name per server
            child, url_c = _model_server("the compare model server", local_c, served_c, key, images_c)
            servers.append(child)
            worker_app = dataclasses.replace(worker_app, compare_model_path=served_c, compare_api_base_url=url_c,
                                             compare_label=app.compare_label or name_c)
    routed = [Worker("127.0.0.1", free_port()) for _ in range(n)]
    workers = []
    for i, w in enumerate(routed):
        env = {**dataclass_env(dataclasses.replace(worker_app, port=w.port), APP_PREFIX),
               **dataclass_env(worker_engine, "ENGINE_"), WORKER_ENV: str(i)}
        workers.append(Child(f"worker-{i}", [sys.executable, str(ROOT / "app.py")], env,
                             _http_ok(f"http://127.0.0.1:{w.port}/"), WORKER_START_S, worker=w))
    return servers, workers, Router(routed)


def serve(app: AppSettings, engine: EngineSettings, n: int) -> int:
    """Run the app as n workers behind one port until Ctrl-C / SIGTERM; the exit status."""
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    return asyncio.run(_serve(app, engine, n))


async def _serve(app: AppSettings, engine: EngineSettings, n: int) -> int:
    try:
        servers, workers, router = plan(app, engine, n)
    except Exception as exc:  # a model that cannot be fetched, ...
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        listening = await router.serve(app.host, app.port)  # first: a port in use is said before any loading
    except OSError as exc:
        print(f"error: cannot listen on {app.host}:{app.port}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    children = servers + workers
    try:
        for child in children:
            child.start()
        starting = asyncio.gather(*(c.wait_ready() for c in servers))
        await _unless(stopping, starting)
        await _unless(stopping, asyncio.gather(*(c.wait_ready() for c in workers)))
        if stopping.is_set():
            return 0
        where = "127.0.0.1" if app.host in ("0.0.0.0", "::") else app.host
        print(f"* Running on http://{where}:{app.port} ({n} app processes"
              + (", the model in a process of its own" if servers else "") + ")", flush=True)
        return await _watch(children, stopping)
    except StartFailed as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2 if exc.code == 2 else 1
    finally:
        listening.close()
        for group in (workers, servers):  # the workers first: the servers' streams end last
            for child in group:
                child.stop()
            for child in group:
                child.wait()


async def _unless(stopping: asyncio.Event, work: asyncio.Future) -> None:
    """Await `work` unless a stop comes first (then cancel it)."""
    stop = asyncio.ensure_future(stopping.wait())
    done, _ = await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
    stop.cancel()
    if work in done:
        work.result()
    else:
        work.cancel()


async def _watch(children: list[Child], stopping: asyncio.Event) -> int:
    """Start again what dies, until told to stop; a child that dies while starting again ends it all."""
    restarting: dict[str, asyncio.Task] = {}
    while not stopping.is_set():
        try:
            await asyncio.wait_for(stopping.wait(), 0.5)
        except asyncio.TimeoutError:
            pass
        for child in children:
            task = restarting.get(child.name)
            if task is not None and task.done():
                task.result()  # StartFailed ends the app
                del restarting[child.name]
            if task is None and not child.alive() and not stopping.is_set():
                child.restarts += 1
                print(f"{child.name} exited with {child.proc.returncode}: starting it again "
                      f"(restart {child.restarts})", file=sys.stderr, flush=True)
                if child.worker is not None:
                    child.worker.up = False
                child.start()
                restarting[child.name] = asyncio.ensure_future(child.wait_ready())
    for task in restarting.values():
        task.cancel()
    return 0
