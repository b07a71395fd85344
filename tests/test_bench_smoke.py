"""Smoke test of the op benchmark: it runs end to end on tiny shapes and writes valid JSON."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_ops_quick(tmp_path):
    out = tmp_path / "ops.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_ops.py"), "--device", "cpu", "--quick", "--no-compile",
         "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| op" in proc.stdout  # the Markdown table
    data = json.loads(out.read_text())
    rows = data["rows"] if isinstance(data, dict) and "rows" in data else data
    ops_seen = {r["op"] for r in rows}
    assert {"sine_embed", "modulated_sine_query", "content_position_attention"} <= ops_seen
    providers = {r["provider"] for r in rows}
    assert "eager" in providers
    for r in rows:
        assert r["median_ms"] > 0
