"""Write the conversations your visitors liked as training data for the next fine-tune.

    python -m chat_ui.export_feedback --out data/liked.jsonl [--history-path PATH] [--all]

Each chat with a 👍 reply becomes one sample, cut after its last liked reply (what follows was
not rated), in the `messages` JSONL format that `training.data.validate` and the pipeline read,
with each answer's rating beside it ("ratings"); error notices and unanswered questions are left
out, and a 👎 reply is never a target (the sample starts after it). With --all, every chat with an answer goes
out, rated or not. The file is written whole or not at all.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from .settings import AppSettings
from .store import SQLiteStore, StoreError, training_record


def export(history_path: str, out: str, liked_only: bool = True) -> int:
    if not Path(history_path).expanduser().exists():
        raise FileNotFoundError(f"{history_path}: no such chat store (the app's --history-path)")
    store = SQLiteStore(history_path)
    try:
        rows = [rec for _, chat in store.all_chats() if (rec := training_record(chat, liked_only))]
    finally:
        store.close()
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for rec in rows:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return len(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSONL file to write")
    p.add_argument("--history-path", default=os.environ.get("APP_HISTORY_PATH", AppSettings.history_path),
                   help="the app's chat store (env APP_HISTORY_PATH)")
    p.add_argument("--all", action="store_true", help="every answered chat, not only the liked ones")
    a = p.parse_args(argv)
    try:
        n = export(a.history_path, a.out, liked_only=not a.all)
    except (OSError, ValueError, StoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{a.out}: {n} {'liked ' if not a.all else ''}conversation{'s' if n != 1 else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
