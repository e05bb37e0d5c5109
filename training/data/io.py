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


def read_records(path: str | Path) -> Iterator[tuple[str, object]]:
    """Yield (where, record) from JSONL (one record a line: where = 'file:LINE') or from a JSON
    array of records, as the tutorials' scripts write them even into files named .jsonl (where =
    'file: record N'). XTuner's own loader reads both; so do we."""
    text = read_text_utf8(path)
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: a JSON array that does not parse: {exc.msg} at column "
                            f"{exc.colno}") from None
        for i, rec in enumerate(records, 1):
            yield f"{path}: record {i}", rec
        return
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{n}", json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{n}: invalid JSON: {exc.msg} at column {exc.colno}{_what_it_is(text)}") from None


def _what_it_is(text: str) -> str:
    """For a file that is not JSONL: what it is instead, if that can be told."""
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        return " (expected JSONL, one JSON record a line, or a JSON array of records)"
    if isinstance(whole, dict):
        keys = ", ".join(list(whole)[:6])
        return f" (the file is one JSON object with keys {keys}: expected JSONL or a JSON array of records)"
    return f" (the file is one JSON {type(whole).__name__}: expected JSONL or a JSON array of records)"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp makes 0600: keep the mode of the file replaced, else what open() would give
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_umask())
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
