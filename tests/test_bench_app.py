"""scripts/bench_app.py in a reduced form: the synthetic engine, 4 users, each path in its own
process, new and returning visitors; it must complete and report every path with every reply
whole (figures are for the benchmark, not a test)."""
from __future__ import annotations

import json
import re
import subprocess
import sys

from conftest import ROOT


def test_bench_app_completes_and_reports(tmp_path):
    out = tmp_path / "rows.json"
    logs = tmp_path / "logs" / "nested"  # created by the bench
    r = subprocess.run([sys.executable, "scripts/bench_app.py", "--users", "4", "--client-procs", "2",
                        "--new-tokens", "40", "--json", str(out), "--logs", str(logs), "--backend", "synthetic",
                        "--synthetic-tokens-per-s", "200", "--synthetic-reply-tokens", "40"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [(row["path"], row["users"]) for row in rows] == [
        ("engine", 4), ("server", 4), ("app new", 4), ("app returning", 4), ("send new", 4), ("send returning", 4)]
    for row in rows:
        assert row["ok"] == 4 and not row["errors"], row
        assert row["total_tps"] > 0 and row["ttft_ms"] > 0
    assert "| app returning | 4 |" in r.stdout and "stream vs engine" in r.stdout
    assert (logs / "app.log").exists()
    # every round a fresh conversation: the app's prompts are the engine's (the chat log says so)
    prompts = {int(n) for n in re.findall(r"prompt_tokens=(\d+)", (logs / "app.log").read_text())}
    assert prompts and max(prompts) < 100, sorted(prompts)  # 66 words; with the last exchange kept: 170
