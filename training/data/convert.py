"""Convert datasets to OpenAI-`messages` JSONL (what our training config reads).

    # a question-answer sheet (XLSX or CSV), question built from named columns
    python -m training.data.convert sheet qa.xlsx out.jsonl --question "{病症}：{症状}" \
        --answer 回答 [--sheet Sheet1] [--system "你是一名医生"]
    python -m training.data.convert alpaca alpaca.json out.jsonl [--system "..."]
    python -m training.data.convert xtuner conversation.jsonl out.jsonl
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import re
import sys
from pathlib import Path
from typing import Iterator

from .io import DataError, check_source, loads, read_jsonl, read_records, read_text_utf8, run_cli, write_jsonl
from .validate import check_sample, conversation_messages

_FIELD = re.compile(r"{([^{}]+)}")


def rows_of_sheet(path: Path, sheet: str | None) -> tuple[list[str], Iterator[tuple[int, list]]]:
    """(header, (row number, values)...) of an XLSX or CSV file."""
    if path.suffix.lower() in (".xlsx", ".xlsm"):
        from openpyxl import load_workbook
        check_source(path)
        check_xlsx_parts(path)
        try:
            wb = load_workbook(path, read_only=True, data_only=True)
        except Exception as exc:
            raise DataError(f"{path}: cannot open as XLSX: {exc}") from None
        if sheet and sheet not in wb.sheetnames:
            raise DataError(f"{path}: sheet {sheet!r} not found (sheets: {', '.join(wb.sheetnames)})")
        rows = wb[sheet] if sheet else wb.worksheets[0]
        declared = (rows.max_row or 0) * (rows.max_column or 0)
        if declared > MAX_SHEET_CELLS:
            raise DataError(f"{path}: the sheet declares {rows.max_row:,} rows x {rows.max_column:,} columns, more "
                            f"than the {MAX_SHEET_CELLS:,} cells read (save the sheet's used range only, or as CSV)")
        it = rows.iter_rows(values_only=True)
        header = [str(h).strip() if h is not None else "" for h in next(it, [])]
        return header, ((n, list(r)) for n, r in enumerate(it, 2))
    reader = csv.reader(io.StringIO(read_text_utf8(path)))
    header = [h.strip() for h in next(reader, [])]
    return header, ((n, r) for n, r in enumerate(reader, 2))


MAX_SHEET_CELLS = 10_000_000      # rows x columns a sheet may declare
MAX_CELL_CHARS = 1_000_000        # one cell's text
MAX_XLSX_PART_BYTES = 512 * 2**20  # a sheet's or the shared strings' XML, unpacked


def check_xlsx_parts(path: Path) -> None:
    """An XLSX is a zip: its parts' unpacked sizes are checked before any is read (a 5 GB string
    cell or a zip bomb would be unpacked into memory whole)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if info.filename.startswith("xl/") and info.file_size > MAX_XLSX_PART_BYTES:
                    raise DataError(f"{path}: its part {info.filename} unpacks to {info.file_size / 2**20:,.0f} MB, more "
                                    f"than the {MAX_XLSX_PART_BYTES // 2**20} MB read (a huge cell, or not a real sheet)")
    except zipfile.BadZipFile:
        raise DataError(f"{path}: cannot open as XLSX: not a zip file") from None


def convert_sheet(path: str | Path, question: str, answer: str, system: str = "",
                  sheet: str | None = None) -> list[dict]:
    path = Path(path)
    header, rows = rows_of_sheet(path, sheet)
    needed = _FIELD.findall(question) + [answer]
    if not _FIELD.findall(question):
        raise DataError("question: name at least one column, e.g. '{问题}'")
    for col in needed:
        if col not in header:
            raise DataError(f"{path}: column {col!r} not found (columns: {', '.join(h for h in header if h)})")
    idx = {h: i for i, h in enumerate(header)}
    out = []
    for n, values in rows:
        def cell(col: str, values: list = values, n: int = n) -> str:
            v = values[idx[col]] if idx[col] < len(values) else None
            text = "" if v is None else str(v).strip()
            if len(text) > MAX_CELL_CHARS:
                raise DataError(f"{path}:{n}: column {col!r}: a cell of {len(text):,} characters, more than the "
                                f"{MAX_CELL_CHARS:,} a training sample's field may hold")
            return text
        if not any(cell(c) for c in needed):
            continue  # a blank row
        for col in needed:
            if not cell(col):
                raise DataError(f"{path}:{n}: column {col!r}: empty cell")
        q = _FIELD.sub(lambda m: cell(m.group(1)), question)
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": q}, {"role": "assistant", "content": cell(answer)}]
        out.append({"messages": msgs})
    if not out:
        raise DataError(f"{path}: no rows with data")
    return out


def convert_alpaca(path: str | Path, system: str = "") -> list[dict]:
    """Alpaca records (a JSON list or JSONL): instruction, input, output."""
    text = read_text_utf8(path)
    if text.lstrip().startswith("["):
        try:
            items = list(enumerate(json.loads(text), 1))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg} at column {exc.colno}") from None
        except (RecursionError, ValueError):
            items = list(enumerate(loads(text, str(path)), 1))  # says what it is, in one line
        label = "record"
    else:
        items, label = list(read_jsonl(path)), "line"
    out = []
    for n, rec in items:
        where = f"{path}:{n}" if label == "line" else f"{path}: record {n}"
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected an object with instruction/input/output")
        instruction, extra, output = (rec.get(k) or "" for k in ("instruction", "input", "output"))
        if not str(instruction).strip():
            raise DataError(f"{where}: instruction: empty")
        if not str(output).strip():
            raise DataError(f"{where}: output: empty answer")
        q = f"{instruction}\n{extra}" if str(extra).strip() else str(instruction)
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": q}, {"role": "assistant", "content": str(output)}]
        out.append({"messages": msgs})
    return out


def convert_xtuner(path: str | Path) -> list[dict]:
    """XTuner's single/multi-turn format: {"conversation": [{"system", "input", "output"}, ...]},
    as JSONL or a JSON array (what the tutorials' generate_data.py writes)."""
    out = []
    for where, rec in read_records(path):
        conv = rec.get("conversation") if isinstance(rec, dict) else None
        out.append({"messages": check_sample(where, {"messages": conversation_messages(where, conv)})})
    if not out:
        raise DataError(f"{path}: no samples (an empty file)")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="kind", required=True)
    s = sub.add_parser("sheet", help="XLSX/CSV question-answer sheet")
    s.add_argument("input")
    s.add_argument("output")
    s.add_argument("--question", required=True, help="template naming columns, e.g. '{问题}'")
    s.add_argument("--answer", required=True, help="answer column")
    s.add_argument("--sheet", help="XLSX sheet name (default: the first)")
    s.add_argument("--system", default="")
    a_ = sub.add_parser("alpaca", help="Alpaca instruction/input/output records")
    a_.add_argument("input")
    a_.add_argument("output")
    a_.add_argument("--system", default="")
    x = sub.add_parser("xtuner", help="XTuner conversation format")
    x.add_argument("input")
    x.add_argument("output")
    a = p.parse_args(argv)

    def work() -> str:
        if a.kind == "sheet":
            rows = convert_sheet(a.input, a.question, a.answer, a.system, a.sheet)
        elif a.kind == "alpaca":
            rows = convert_alpaca(a.input, a.system)
        else:
            rows = convert_xtuner(a.input)
        return f"{a.output}: {write_jsonl(a.output, rows)} samples"
    return run_cli(work)


if __name__ == "__main__":
    sys.exit(main())
