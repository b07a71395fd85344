"""Compile every Triton kernel of dabdetr (kernels/, forward and backward, each dtype) to cubin for
sm_80 (A100) and sm_90 (H100) — no GPU needed — and report registers, spills and shared memory.

    python benchmarks/triton_compile_report.py                 # largest autotuning config per kernel
    python benchmarks/triton_compile_report.py --all-configs   # every autotuning config
    python benchmarks/triton_compile_report.py --json out.json

Checks (exit status 1 if any fails): every kernel compiles; its shared memory fits the
architecture's per-block limit; registers x threads fit the register file; fp32 kernels contain no
TF32 (``input_precision="ieee"``, DESIGN.md). Spilling is reported, not failed: ``stack`` is the
per-thread stack frame ptxas allocated (spilled registers and local arrays; libdevice's sinf keeps
a small one for its rarely taken large-argument path), ``local`` other local memory; rows with a
stack > 256 B are marked WARN. Registers / stack come from ``cuobjdump --dump-resource-usage`` on the
cubin (Triton ships it), shared memory from the compiled kernel's metadata.

Sine kernels are compiled at F = 128 (DAB-DETR), attention kernels at head dims 64 (the largest the
GPU kernels take; ``--head-dim 32`` for DAB-DETR's), with every optional input present (mask,
ref_wh, pos_scale) and contiguous last dims (stride 1 is specialised, as at run time).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

# The kernels must be real JIT functions, not interpreted ones.
os.environ["TRITON_INTERPRET"] = "0"
os.environ["DABDETR_TRITON_AUTOTUNE"] = "1"  # every config of every autotuning set

ARCHS = {80: 166912, 90: 232448}  # sm -> max shared memory per block (opt-in), bytes
REGISTER_FILE = 65536  # 32-bit registers per SM (and per block) on sm_80 / sm_90
DTYPES = ("fp32", "bf16", "fp16")
STACK_WARN = 256  # bytes per thread


def _resource_usage(cubin: bytes, cuobjdump: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        cmd = [cuobjdump, "--dump-resource-usage", f.name]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if not m:
        raise RuntimeError(f"cannot parse cuobjdump output:\n{out}")
    reg, stack, shared, local = (int(x) for x in m.groups())
    return {"regs": reg, "stack": stack, "static_shared": shared, "local": local}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--all-configs", action="store_true", help="compile every autotuning config")
    ap.add_argument("--head-dim", type=int, default=None, help="attention head dims (default 64)")
    ap.add_argument("--arch", type=int, nargs="*", default=sorted(ARCHS), choices=sorted(ARCHS), help="SM versions")
    ap.add_argument("--dtype", nargs="*", default=list(DTYPES))
    ap.add_argument("--json", default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from dabdetr.kernels import attention, sine

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    print(f"triton {triton.__version__}; targets: {', '.join(f'sm_{a}' for a in args.arch)}; "
          f"configs: {'all' if args.all_configs else 'largest per kernel'}")
    rows, failures = [], []
    start = time.time()
    for dtype in args.dtype:
        specs = sine.compile_specs(dtype, all_configs=args.all_configs)
        akw = {"head_dim": args.head_dim} if args.head_dim else {}
        specs += attention.compile_specs(dtype, all_configs=args.all_configs, **akw)
        for spec in specs:
            cfg = " ".join(f"{k}={v}" for k, v in spec["meta"].items())
            cfg += f" w={spec['num_warps']} s={spec['num_stages']}"
            for arch in args.arch:
                row = {"kernel": spec["name"], "dtype": dtype, "arch": f"sm_{arch}", "config": cfg}
                t0 = time.time()
                try:
                    src = ASTSource(fn=spec["fn"], signature=spec["signature"], constexprs=spec["constexprs"],
                                    attrs=spec["attrs"])
                    k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                       options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]})
                    usage = _resource_usage(k.asm["cubin"], cuobjdump)
                    shared = int(k.metadata.shared)
                    row.update(usage, shared=shared, seconds=round(time.time() - t0, 2), ok=True, problems=[])
                    threads = spec["num_warps"] * 32
                    if shared > ARCHS[arch]:
                        row["problems"].append(f"shared memory {shared} B > {ARCHS[arch]} B")
                    if usage["regs"] * threads > REGISTER_FILE:
                        row["problems"].append(f"{usage['regs']} regs x {threads} threads > {REGISTER_FILE}")
                    if dtype == "fp32" and re.search(r"\.tf32", k.asm["ptx"]):
                        row["problems"].append("TF32 instructions in an fp32 kernel")
                except Exception as exc:  # noqa: BLE001 - reported below
                    first = str(exc).splitlines()[0] if str(exc) else ""
                    row.update(ok=False, problems=[f"{type(exc).__name__}: {first}"],
                               seconds=round(time.time() - t0, 2))
                if row["problems"]:
                    row["ok"] = False
                    failures.append(row)
                rows.append(row)

    header = (f"{'kernel':<24} {'dtype':<5} {'arch':<6} {'regs':>4} {'stack':>5} {'local':>5} {'smem':>7} "
              f"{'s':>5}  config")
    print(header)
    print("-" * len(header))
    for r in rows:
        if "regs" in r:
            note = "" if r["ok"] else "  FAIL: " + "; ".join(r["problems"])
            if r["ok"] and (r["stack"] > STACK_WARN or r["local"] > 0):
                note = "  WARN: spills"
            print(f"{r['kernel']:<24} {r['dtype']:<5} {r['arch']:<6} {r['regs']:>4} {r['stack']:>5} {r['local']:>5} "
                  f"{r['shared']:>7} {r['seconds']:>5.1f}  {r['config']}{note}")
        else:
            print(f"{r['kernel']:<24} {r['dtype']:<5} {r['arch']:<6} {'-':>4} {'-':>5} {'-':>5} {'-':>7} "
                  f"{r['seconds']:>5.1f}  {r['config']}  FAIL: " + "; ".join(r["problems"]))
    print(f"{len(rows)} compilations, {len(failures)} failed, {time.time() - start:.0f} s "
          f"(stack / local: bytes per thread; smem: shared memory bytes per block)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "rows": rows}, f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
