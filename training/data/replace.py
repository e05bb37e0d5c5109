"""Replace text in the message contents of a JSONL dataset (the tutorials' rename-the-assistant
script), leaving keys and roles alone; the input is validated first, the output written atomically.

    python -m training.data.replace data.jsonl out.jsonl --old 机智流 --new 小明 [--roles assistant]
"""
from __future__ import annotations

import argparse
import sys

from .io import DataError, run_cli, write_jsonl
from .validate import ROLES, samples


def replace(path: str, out: str, old: str, new: str, roles: tuple[str, ...] = ROLES) -> tuple[int, int]:
    """Returns (samples written, replacements made)."""
    if not old:
        raise DataError("old: must not be empty")
    rows, hits = [], 0
    for _, msgs in samples(path):  # JSONL or a JSON array; messages or XTuner conversations
        for m in msgs:
            if m["role"] in roles:
                hits += m["content"].count(old)
                m["content"] = m["content"].replace(old, new)
        rows.append({"messages": msgs})
    if not rows:
        raise DataError(f"{path}: no samples (an empty file)")
    return write_jsonl(out, rows), hits


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("input")
    p.add_argument("output", help="may be the input file itself")
    p.add_argument("--old", "--old_text", "--old-text", dest="old", required=True,
                   help="text to replace (--old_text as in the tutorials' script)")
    p.add_argument("--new", "--new_text", "--new-text", dest="new", required=True, help="replacement")
    p.add_argument("--roles", default=",".join(ROLES), help="comma list of roles to change")
    a = p.parse_args(argv)
    roles = tuple(r.strip() for r in a.roles.split(",") if r.strip())

    def work() -> str:
        if bad := [r for r in roles if r not in ROLES]:
            raise DataError(f"roles: unknown role {bad[0]!r} (use {', '.join(ROLES)})")
        count, hits = replace(a.input, a.output, a.old, a.new, roles)
        return f"{a.output}: {count} samples, {hits} replacements"
    return run_cli(work)


if __name__ == "__main__":
    sys.exit(main())
