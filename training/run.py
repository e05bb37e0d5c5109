"""Run XTuner: train, convert a checkpoint to a Hugging Face adapter, merge it into the base.

Every step runs as a subprocess of this (training) interpreter — XTuner's own tool for train
and convert, PEFT's merge in the base's dtype for merge (training/merge_adapter.py) — checks its
exit code, keeps the full log in the work dir, and writes its output folder atomically: a
crashed convert or merge leaves a `.partial` folder, never one that looks complete.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

from .data.io import DataError, atomic_dir
from .settings import TrainSettings

ROOT = Path(__file__).resolve().parents[1]
_ITER = re.compile(r"Iter\(train\)\s*\[\s*(\d+)/(\d+)\].*?loss:\s*([\d.]+)")


class StepFailed(RuntimeError):
    """An XTuner step exited non-zero; the message names the step and its log."""


class Stopped(Exception):
    """Ctrl-C or SIGTERM: the step running was stopped with its whole process tree."""

    def __init__(self, signum: int, step: str = "", where: str = ""):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.step, self.where = signum, step, where


def _raise_stopped(signum: int, frame: object) -> None:
    raise Stopped(signum)


@contextlib.contextmanager
def stoppable() -> Iterator[None]:
    """While inside: Ctrl-C and SIGTERM raise Stopped (so the step's children are stopped too and
    the run says so), instead of ending this process alone and leaving a trainer running."""
    old = {sig: signal.signal(sig, _raise_stopped) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _stop_tree(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """End the step's whole process group (torchrun's workers, XTuner's dataloader workers):
    SIGTERM, then SIGKILL after `grace_s`. Further signals wait until it is done."""
    if proc.poll() is not None:
        return
    old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


def _env(local_model: bool) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    if local_model:
        env["HF_HUB_OFFLINE"] = "1"  # a local folder must not trigger hub lookups
    return env


def run_step(name: str, cmd: list[str], log: Path, local_model: bool = True) -> None:
    """Run a step, teeing its output to `log`; training iterations become a progress line with
    the time left. The step runs in a process group of its own: when this run is stopped
    (Ctrl-C, SIGTERM: `stoppable`), the whole group is stopped with it."""
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"[{name}] {' '.join(cmd)}", flush=True)
    tail: list[str] = []
    start, first, where = time.monotonic(), None, ""
    with open(log, "a", encoding="utf-8") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=_env(local_model), cwd=ROOT, errors="replace", start_new_session=True)
        try:
            for line in proc.stdout:
                f.write(line)
                f.flush()  # `tail -f train.log` shows each line as it comes
                tail = (tail + [line.rstrip()])[-40:]
                m = _ITER.search(line)
                if m:
                    done, total, loss = int(m.group(1)), int(m.group(2)), m.group(3)
                    now = time.monotonic()
                    first = first or (now, done)
                    eta = ""
                    if done > first[1]:  # the rate since the first logged line (start-up left out)
                        eta = f" ETA {_clock((now - first[0]) / (done - first[1]) * (total - done))}"
                    where = f"iteration {done}/{total}"
                    bar = "#" * int(30 * done / total)
                    print(f"\r[{name}] [{bar:<30}] {done}/{total} loss {loss} {_clock(now - start)}{eta}  ",
                          end="", flush=True)
            code = proc.wait()
        except Stopped as stop:
            _stop_tree(proc)
            print(flush=True)
            stop.step, stop.where = name, where
            raise
        finally:
            _stop_tree(proc)
    print(flush=True)
    if code != 0:
        shown = "\n".join(tail[-25:])
        raise StepFailed(f"{name} failed (exit {code}); full log: {log}\n{shown}")


def _tool(name: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "training.xtuner_tool", name, *args]


AS_RUN = "config_as_run.py"  # mmengine's flattened dump of the config, written when training starts


def train(config: Path, s: TrainSettings, resume: bool = False) -> Path:
    """XTuner's train on a copy of `config`: mmengine dumps the config it ran into the work dir
    under the name it was given, which would replace the readable WORK_DIR/config.py; the dump
    lands beside it as config_as_run.py instead."""
    work = Path(s.work_dir)
    copy = work / ".xtuner" / AS_RUN
    copy.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(config, copy)
    args = [str(copy), "--work-dir", str(work), "--seed", str(s.seed)]
    if s.deepspeed:
        args += ["--deepspeed", f"deepspeed_{s.deepspeed}"]
    if resume:
        last = latest_checkpoint(work)
        if last is None:
            raise DataError(f"resume: no checkpoint in {work}")
        args += ["--resume", str(last)]
    cmd = _tool("train", *args)
    # Several GPUs: what `NPROC_PER_NODE=N xtuner train` does, with our interpreter. DeepSpeed
    # on one GPU goes the same way: run as a plain process it looks for MPI (mpi4py) to find
    # its rank; under torchrun the rank comes from the environment.
    # Several hosts: XTuner's own variables (NNODES, NODE_RANK, ADDR, PORT), set on every host.
    hosts = _multi_node()
    if s.gpus > 1 or s.deepspeed or hosts:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={s.gpus}", *hosts,
               "-m", "training.xtuner_tool", "train", *args, "--launcher", "pytorch"]
    run_step("train", cmd, work / "train.log", local_model=Path(s.model_path).exists())
    return work


def _multi_node() -> list[str]:
    """torchrun's rendezvous flags from XTuner's multi-node variables (none on one host)."""
    nnodes = int(os.environ.get("NNODES", "1"))
    if nnodes <= 1:
        return []
    return [f"--nnodes={nnodes}", f"--node_rank={os.environ.get('NODE_RANK', '0')}",
            f"--master_addr={os.environ.get('ADDR', '127.0.0.1')}", f"--master_port={os.environ.get('PORT', '29500')}"]


def checkpoints(work_dir: str | Path) -> list[tuple[int, Path]]:
    found = []
    for p in Path(work_dir).glob("iter_*.pth"):
        m = re.fullmatch(r"iter_(\d+)\.pth", p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(work_dir: str | Path) -> Path | None:
    marker = Path(work_dir) / "last_checkpoint"
    if marker.exists():
        p = Path(marker.read_text().strip())
        if p.exists():
            return p
    found = checkpoints(work_dir)
    return found[-1][1] if found else None


def convert(config: Path, pth: Path, out: str | Path, log: Path) -> Path:
    """XTuner .pth checkpoint -> HF adapter folder (safetensors, fp32: without these flags
    pth_to_hf writes an fp16 .bin), stamped with the checkpoint it came from. Only load
    checkpoints this pipeline wrote: XTuner reads .pth with weights_only=False."""
    with atomic_dir(out) as tmp:
        run_step("convert", _tool("pth_to_hf", str(config), str(pth), str(tmp), "--fp32",
                                  "--safe-serialization"), log)
        (tmp / SOURCE).write_text(json.dumps(_stamp(pth)), encoding="utf-8")
    return Path(out)


SOURCE = "converted_from.json"


def _stamp(pth: Path) -> dict:
    st = Path(pth).stat()
    return {"checkpoint": str(Path(pth).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def converted(folder: Path, pth: Path) -> bool:
    """Is `folder` a complete conversion of exactly this checkpoint? (A rerun into the same
    work dir writes new iter_N.pth files under the same names: old adapters must not pass.)"""
    try:
        return json.loads((folder / SOURCE).read_text(encoding="utf-8")) == _stamp(pth)
    except (OSError, ValueError):
        return False


def export_full(config: Path, pth: Path, out: str | Path, base: Path, log: Path) -> Path:
    """method full: the checkpoint is the whole model; pth_to_hf writes it as a Hugging Face
    model folder (there is no adapter to merge), with the base's tokenizer and chat template."""
    with atomic_dir(out) as tmp:
        run_step("convert", _tool("pth_to_hf", str(config), str(pth), str(tmp), "--safe-serialization"), log)
        if base.is_dir():
            for f in base.iterdir():
                if f.name.startswith(("tokenizer", "special_tokens", "chat_template")) and not (tmp / f.name).exists():
                    shutil.copy2(f, tmp / f.name)
            keep_chat_template(base, tmp)
    return Path(out)


def merge(base: str, adapter: Path, out: str | Path, log: Path, device: str = "cpu",
          max_shard_size: str = "2GB") -> Path:
    """Merge the adapter into the base model; the result keeps the base tokenizer's chat
    template so the serving side renders prompts the way training did."""
    with atomic_dir(out) as tmp:  # in the base's dtype (XTuner's merge tool casts to float16)
        run_step("merge", [sys.executable, "-m", "training.merge_adapter", str(base), str(adapter), str(tmp),
                           "--device", device, "--max-shard-size", max_shard_size], log,
                 local_model=Path(base).exists())
        keep_chat_template(Path(base), tmp)
    return Path(out)


def keep_chat_template(base: Path, merged: Path) -> None:
    cfg_path = merged / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    if cfg.get("chat_template"):
        return
    template = None
    if (base / "tokenizer_config.json").exists():
        template = json.loads((base / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")
    if not template and (base / "chat_template.jinja").exists():
        template = (base / "chat_template.jinja").read_text(encoding="utf-8")
    if not template:
        raise StepFailed(f"merge: neither the merged model nor {base} has a chat_template")
    cfg["chat_template"] = template
    cfg_path.write_text(json.dumps(cfg, ensure_ascii=False, indent=2), encoding="utf-8")
