"""Smoke test of the op benchmark: it runs end to end on tiny shapes and writes valid JSON."""

import json
import os
import subprocess
import sys
from pathlib import Path

from dabdetr import cpu_memory

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
    # the process kept freed memory for reuse (every provider alike), where libc is glibc
    assert data["settings"]["malloc"].startswith("retain" if cpu_memory.glibc_version() else "default")
    rows = data["rows"] if isinstance(data, dict) and "rows" in data else data
    ops_seen = {r["op"] for r in rows}
    assert {"sine_embed", "modulated_sine_query", "content_position_attention"} <= ops_seen
    providers = {r["provider"] for r in rows}
    assert "eager" in providers
    for r in rows:
        assert r["median_ms"] > 0


def test_bench_model_quick(tmp_path):
    """bench_model.py --quick (tiny preset, 96x128 batch 2) with every kind of provider (+winograd
    included: the tiny backbone's 128-channel layer4 takes it); compile
    through the aot_eager backend (inductor's cold compile would dominate a smoke test); one thread
    (OpenMP threads spin at barriers when another process holds the cores)."""
    out = tmp_path / "model.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_model.py"), "--device", "cpu", "--quick", "--threads", "1",
         "--providers", "eager,fused,fused+compile,fused+winograd", "--compile-backend", "aot_eager", "--no-plot",
         "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| provider" in proc.stdout and "Breakdown of one train step" in proc.stdout
    assert (tmp_path / "model.md").exists()
    data = json.loads(out.read_text())
    assert data["benchmark"] == "bench_model" and data["settings"]["preset"] == "tiny"
    (case,) = data["cases"]
    assert set(case["providers"]) == {"eager", "fused", "fused+compile", "fused+winograd"}
    for name, p in case["providers"].items():
        assert not p.get("errors"), (name, p.get("errors"))
        assert p["train_step"]["median_ms"] > 0 and p["infer"]["median_ms"] > 0, name
        assert p["infer_images_per_s"] > 0 and p["decoder_fwd_bwd"]["median_ms"] > 0, name
        assert p["train_peak_bytes"] > 0, name
        assert sum(v for v in p["breakdown_ms"].values() if v) > 0, name
    assert case["providers"]["eager"]["train_speedup_vs_eager"] == 1.0
    assert case["flops"]["flops"] > 0 and abs(case["flops"]["macs"] * 2 - case["flops"]["flops"]) <= 1
    assert set(case["acceptance"]) == {"decoder_fused_vs_eager", "train_fused_vs_eager", "train_best_vs_eager"}
    # the vector ISA is recorded and named in the header: machines of the same name differ by it
    import torch

    isa = torch.backends.cpu.get_cpu_capability()
    assert data["environment"]["cpu_capability"] == isa and f", {isa}, 1 threads)" in proc.stdout


def test_environment_reads_the_nvidia_driver_version():
    """Results files record the installed driver (not torch's build CUDA): the version parsed from
    /proc/driver/nvidia/version in both module flavours."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import _common as C

    prop = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.65.06  Sun Jul 27 07:09:47 UTC 2025\nGCC version: gcc 12"
    open_ = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.86.15  Release Build  (dvs-builder@U16)"
    assert C.nvidia_driver_version(prop) == "580.65.06"
    assert C.nvidia_driver_version(open_) == "570.86.15"
    assert C.nvidia_driver_version("no driver here") is None
    info = C.cuda_driver_info()
    assert set(info) == {"cuda_driver_api", "nvidia_driver"}


def test_bench_winograd_quick(tmp_path):
    """bench_winograd.py --quick: every 3x3 stride-1 shape of the R50 body timed against the direct
    path, with the float32 errors against float64 (bounded as in test_winograd)."""
    out = tmp_path / "wino.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_winograd.py"), "--quick", "--threads", "1",
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| layer" in proc.stdout and (tmp_path / "wino.md").exists()
    data = json.loads(out.read_text())
    (case,) = data["cases"]
    assert [r["layer"] for r in case["rows"]] == ["layer1", "layer2", "layer3", "layer4"]
    assert [r["count"] for r in case["rows"]] == [3, 3, 5, 2]  # R50's 3x3 stride-1 convolutions
    for r in case["rows"]:
        assert set(r["fwd_ms"]) == {"direct", "F(2,3)", "F(4,3)"} and min(r["fwd_ms"].values()) > 0
        assert ("fwd_bwd_ms" in r) == r["trains"] == (r["layer"] != "layer1")
        assert r["error"]["direct"] < 1e-5 and r["error"]["F(2,3)"] < 2e-5 and r["error"]["F(4,3)"] < 1e-4
