"""Reading and writing JSONL with errors that name the file and line, and atomic writes."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator


class DataError(ValueError):
    """One-line description of bad input: 'file:line: field: problem'."""


def read_text_utf8(path: str | Path) -> str:
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        hint = ""
        try:
            raw.decode("gbk")
            hint = " (it decodes as GBK: convert it with `iconv -f gbk -t utf-8`)"
        except UnicodeDecodeError:
            pass
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x}){hint}") from None
    return text.lstrip("\ufeff")


def read_jsonl(path: str | Path) -> Iterator[tuple[int, object]]:
    """Yield (line number, parsed object) for each non-blank line."""
    for n, line in enumerate(read_text_utf8(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{n}: invalid JSON: {exc.msg} at column {exc.colno}") from None


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(dest: str | Path) -> Iterator[Path]:
    """Yield `dest.partial` to build a folder in; it becomes `dest` only if the block succeeds,
    so a folder at `dest` is always complete (a failure leaves just the .partial)."""
    dest = Path(dest)
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    yield partial
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(partial, dest)


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> int:
    """Write rows atomically; returns the count. A failure mid-way leaves no output file."""
    count = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def run_cli(fn: Callable[[], object], errors: tuple[type[BaseException], ...] = ()) -> int:
    """Run a tool's work: print what it returns, or one `error: ...` line and exit code 1."""
    try:
        result = fn()
    except (DataError, OSError, *errors) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if result is not None:
        print(result)
    return 0
