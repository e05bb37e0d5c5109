"""Reading and writing JSONL with errors that name the file and line, and atomic writes."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator


class DataError(ValueError):
    """One-line description of bad input: 'file:line: field: problem'."""


MAX_FILE_BYTES = 512 * 2**20   # a whole file read at once (a JSON array, a CSV, an Alpaca file)
MAX_LINE_BYTES = 16 * 2**20    # one JSONL record


def check_source(path: str | Path, whole: bool = True) -> int:
    """The input is a regular file (not /dev/zero, a pipe, a folder), and, read `whole`, not over
    MAX_FILE_BYTES: its size; else one line saying what it is."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise DataError(f"{path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise DataError(f"{path}: not a regular file (a device, a pipe or a folder): give a data file")
    if whole and st.st_size > MAX_FILE_BYTES:
        raise DataError(f"{path}: {st.st_size / 2**20:,.0f} MB, more than the {MAX_FILE_BYTES // 2**20} MB read at once "
                        "(JSONL, one record a line, is read a line at a time)")
    return st.st_size


def _decode(raw: bytes, path: str | Path, line: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        at = line + raw[:exc.start].count(b"\n")
        hint = ""
        try:
            raw.decode("gbk")
            hint = " (it decodes as GBK: convert it with `iconv -f gbk -t utf-8`)"
        except UnicodeDecodeError:
            pass
        raise DataError(f"{path}:{at}: not UTF-8 text (byte 0x{raw[exc.start]:02x}){hint}") from None


def loads(text: str, where: str) -> object:
    """json.loads, its every failure one line: bad JSON, nesting too deep, a number too long."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: invalid JSON: {exc.msg} at column {exc.colno}") from None
    except RecursionError:
        raise DataError(f"{where}: JSON nested too deep to read") from None
    except ValueError as exc:  # e.g. an integer of 100,000 digits
        raise DataError(f"{where}: a value that cannot be read: {exc}") from None


def read_text_utf8(path: str | Path) -> str:
    check_source(path)
    return _decode(Path(path).read_bytes(), path, 1).lstrip("\ufeff")


def _lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a file read a line at a time, each line at most MAX_LINE_BYTES."""
    check_source(path, whole=False)
    with open(path, "rb") as f:
        n = 0
        while True:
            raw = f.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            n += 1
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                raise DataError(f"{path}:{n}: a line over {MAX_LINE_BYTES // 2**20} MB: not a data record")
            text = _decode(raw, path, n)
            yield n, text.lstrip("\ufeff") if n == 1 else text


def read_jsonl(path: str | Path) -> Iterator[tuple[int, object]]:
    """Yield (line number, parsed object) for each non-blank line."""
    for n, line in _lines(path):
        if line.strip():
            yield n, loads(line, f"{path}:{n}")


def read_records(path: str | Path) -> Iterator[tuple[str, object]]:
    """Yield (where, record) from JSONL (one record a line: where = 'file:LINE') or from a JSON
    array of records, as the tutorials' scripts write them even into files named .jsonl (where =
    'file: record N'). XTuner's own loader reads both; so do we. A line is read at a time, a JSON
    array whole (up to MAX_FILE_BYTES)."""
    check_source(path, whole=False)
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(b"["):
        text = read_text_utf8(path)
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: a JSON array that does not parse: {exc.msg} at column "
                            f"{exc.colno}") from None
        except (RecursionError, ValueError) as exc:
            raise DataError(f"{path}: {'JSON nested too deep to read' if isinstance(exc, RecursionError) else exc}") \
                from None
        for i, rec in enumerate(records, 1):
            yield f"{path}: record {i}", rec
        return
    for n, line in _lines(path):
        if not line.strip():
            continue
        try:
            yield f"{path}:{n}", loads(line, f"{path}:{n}")
        except DataError as exc:
            if n == 1 and "invalid JSON" in str(exc):  # a file that is not JSONL: say what it is instead
                raise DataError(f"{exc}{_what_it_is(read_text_utf8(path))}") from None
            raise


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
    """Yield a temp path beside `path`; it replaces `path` only if the block succeeds. A
    symlink is written through (its target replaced, the link kept), and a target that is no
    regular file (`--out /dev/stdout`, a pipe) is written to directly: never replaced by a file."""
    path = Path(path)
    if path.is_symlink():
        target = path.resolve()
        if str(target).startswith(("/proc/", "/dev/")):  # /dev/stdout: whatever the descriptor is, write to it
            yield path
            return
        path = target
    if path.exists() and not path.is_file():
        yield path
        return
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
