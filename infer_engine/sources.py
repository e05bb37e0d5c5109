"""Where a model comes from: a local folder, an OpenXLab repository, ModelScope or Hugging Face.

    resolve_model("models/merged")                      -> that folder
    resolve_model("openxlab://OpenLMLab/internlm2-chat-1_8b")
    resolve_model("modelscope://Shanghai_AI_Laboratory/internlm2-chat-1_8b")
    resolve_model("hf://internlm/internlm2-chat-1_8b")  (or a bare id with source="huggingface")

Downloads are cached under `cache_dir`, resumable (an interrupted OpenXLab clone is picked up
where it stopped; the hub libraries resume partial files), show progress, and fail with
`ModelSourceError` naming the source and the reason. OpenXLab repositories are fetched the
way the deployment tutorials do it, with `git clone` + `git lfs pull`: the `openxlab` SDK pins
old requests/setuptools and returns None instead of raising, so it stays out of this
environment.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from .errors import EngineError

SOURCES = ("local", "openxlab", "modelscope", "huggingface")
_ALIASES = {"hf": "huggingface", "ms": "modelscope", "huggingface": "huggingface",
            "modelscope": "modelscope", "openxlab": "openxlab"}
OPENXLAB_GIT = "https://code.openxlab.org.cn"  # OPENXLAB_GIT_BASE overrides (mirrors, tests)
DEFAULT_CACHE = os.environ.get("MODEL_CACHE_DIR", str(Path.home() / ".cache" / "chat-models"))
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelSourceError(EngineError):
    status = 502
    kind = "model_source_error"


def parse_model_ref(ref: str, default_source: str = "huggingface") -> tuple[str, str]:
    """'openxlab://a/b' -> ('openxlab', 'a/b'); an existing folder -> ('local', path)."""
    if "://" in ref:
        scheme, _, repo = ref.partition("://")
        source = _ALIASES.get(scheme.lower())
        if source is None:
            raise ModelSourceError(f"unknown model source {scheme!r} in {ref!r} "
                                   f"(use openxlab://, modelscope:// or hf://)", param="model_path")
    elif Path(ref).expanduser().exists():
        return "local", str(Path(ref).expanduser())
    else:
        source, repo = _ALIASES.get(default_source, default_source), ref
    if source not in SOURCES[1:]:
        raise ModelSourceError(f"unknown model source {default_source!r} ({', '.join(SOURCES)})",
                               param="model_source")
    if not _REPO_ID.match(repo):
        raise ModelSourceError(f"{ref!r} is neither a local folder nor an 'owner/name' model id",
                               param="model_path")
    return source, repo


def resolve_model(ref: str, default_source: str = "huggingface", cache_dir: str = DEFAULT_CACHE,
                  revision: str | None = None, hf_endpoint: str | None = None) -> str:
    """Return a local folder holding the model, downloading it first when needed."""
    source, repo = parse_model_ref(ref, default_source)
    if source == "local":
        return repo
    cache = Path(cache_dir).expanduser()
    try:
        if source == "openxlab":
            base = os.environ.get("OPENXLAB_GIT_BASE", OPENXLAB_GIT).rstrip("/")
            return str(_git_lfs_clone(f"{base}/{repo}.git", cache / "openxlab" / repo, revision))
        if source == "modelscope":
            try:
                from modelscope import snapshot_download as ms_download
            except ImportError:
                raise ModelSourceError("modelscope: the `modelscope` package is not installed "
                                       "(pip install modelscope)") from None
            return ms_download(repo, revision=revision, cache_dir=str(cache / "modelscope"))
        from huggingface_hub import snapshot_download
        return snapshot_download(repo, revision=revision, cache_dir=str(cache / "huggingface"),
                                 endpoint=hf_endpoint)
    except ModelSourceError:
        raise
    except Exception as exc:  # network, auth, missing repo: say which source and why
        raise ModelSourceError(f"{source}: cannot download {repo!r}: {_last_line(exc)}") from exc


def _git_lfs_clone(url: str, dest: Path, revision: str | None) -> Path:
    """Clone (or resume) into dest.partial, pull LFS files, then rename: a folder at `dest`
    is always complete."""
    if (dest / ".git").exists():
        return dest
    partial = dest.with_name(dest.name + ".partial")
    partial.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "GIT_LFS_SKIP_SMUDGE": "1", "GIT_TERMINAL_PROMPT": "0"}
    if not (partial / ".git").exists():
        shutil.rmtree(partial, ignore_errors=True)
        _git(["clone", "--progress", url, str(partial)], env, "openxlab", url)
    if revision:
        _git(["-C", str(partial), "checkout", revision], env, "openxlab", url)
    if shutil.which("git-lfs") is None and _uses_lfs(partial):
        raise ModelSourceError(f"openxlab: {url} stores weights with Git LFS, but git-lfs is not "
                               "installed (apt-get install git-lfs; on OpenXLab list it in packages.txt)")
    if shutil.which("git-lfs") is not None:
        _git(["-C", str(partial), "lfs", "pull"], env, "openxlab", url)  # resumes partial objects
    os.replace(partial, dest)
    return dest


def _uses_lfs(repo: Path) -> bool:
    attrs = repo / ".gitattributes"
    return attrs.exists() and "filter=lfs" in attrs.read_text(errors="replace")


def _git(args: list[str], env: dict, source: str, url: str) -> None:
    """Run git, echoing its progress to our stderr and keeping the tail to explain a failure."""
    proc = subprocess.Popen(["git", *args], env=env, stderr=subprocess.PIPE)
    tail = b""
    for chunk in iter(lambda: proc.stderr.read1(4096), b""):
        sys.stderr.buffer.write(chunk)
        sys.stderr.flush()
        tail = (tail + chunk)[-4000:]
    if proc.wait() != 0:
        verb = args[2] if args[0] == "-C" else args[0]
        reason = _last_line(tail.decode(errors="replace").replace("\r", "\n"))
        raise ModelSourceError(f"{source}: git {verb} {url} failed: {reason}")


def _last_line(err: object) -> str:
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(err).__name__
