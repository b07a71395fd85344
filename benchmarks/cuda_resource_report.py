"""Resource report of the CUDA kernels (csrc/cuda/*.cu): per kernel and architecture the registers,
static shared memory, stack frame and spill bytes from ``ptxas -v``, the dynamic shared memory the
host code requests (attention kernels, at DAB-DETR's head dims and at the largest supported ones),
and a SASS check: the float16 / bfloat16 attention kernels must contain tensor-core instructions
(HMMA), the float32 / float64 ones must not (IEEE FFMA / DFMA).

Needs no GPU: it compiles device code only (``nvcc -cubin``, the flags of setup.py) and
disassembles with the ``cuobjdump`` that Triton's wheel carries (``triton/backends/nvidia/bin``)
when the CUDA toolkit has none.

    python benchmarks/cuda_resource_report.py [--archs 80,90] [--out benchmarks/results]

Writes ``cuda_resources.md`` and ``cuda_resources.json`` into ``--out``; exits non-zero when a
kernel spills or an fp16/bf16 attention kernel has no HMMA.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def nvcc_path() -> str:
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    cand = os.path.join(home, "bin", "nvcc")
    return cand if os.path.exists(cand) else (shutil.which("nvcc") or "nvcc")


def cuobjdump_path() -> str | None:
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    for cand in (os.path.join(home, "bin", "cuobjdump"), shutil.which("cuobjdump")):
        if cand and os.path.exists(cand):
            return cand
    try:
        import triton

        cand = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        if os.path.exists(cand):
            return cand
    except ImportError:
        pass
    return None


def include_flags() -> list[str]:
    from torch.utils import cpp_extension

    purelib = sysconfig.get_paths()["purelib"]
    incs = [os.path.join(ROOT, "csrc")] + cpp_extension.include_paths()
    incs += sorted(glob.glob(os.path.join(purelib, "nvidia", "*", "include")))
    incs.append(sysconfig.get_paths()["include"])
    return [f"-I{p}" for p in incs]


def nvcc_flags() -> list[str]:
    import torch

    return [
        "-std=c++20", "-O3", "--expt-relaxed-constexpr", "-lineinfo", "-Xptxas", "-v",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
        "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
        "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
    ] + include_flags()


def demangle(names: list[str]) -> dict:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout.split("\n")
    return {n: (out[i] if i < len(out) and out[i] else n) for i, n in enumerate(names)}


def short_name(pretty: str) -> str:
    """'void dabdetr::cuda::(anonymous namespace)::attn_fwd_kernel<__half>(...)' -> 'attn_fwd_kernel<__half>'."""
    s = pretty.replace("(anonymous namespace)::", "")
    s = s.split("(")[0]
    s = s.replace("void ", "").replace("dabdetr::cuda::", "")
    s = s.replace("__nv_bfloat16", "bf16").replace("__half", "fp16")
    s = re.sub(r"\bfloat\b", "fp32", s)
    s = re.sub(r"\bdouble\b", "fp64", s)
    return s.strip()


def compile_cubin(src: str, arch: int, workdir: str) -> tuple[str, str]:
    cubin = os.path.join(workdir, f"{os.path.basename(src)}.sm{arch}.cubin")
    cmd = [nvcc_path(), *nvcc_flags(), f"-gencode=arch=compute_{arch},code=sm_{arch}", "-cubin", "-o", cubin, src]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"nvcc failed for {src} sm_{arch}:\n{res.stderr[-4000:]}")
    return cubin, res.stdout + res.stderr


def parse_ptxas(log: str, arch: int) -> list[dict]:
    rows, cur = [], None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for 'sm_(\d+)'", line)
        if m:
            cur = {"mangled": m.group(1), "arch": int(m.group(2))}
            rows.append(cur)
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["registers"] = int(m.group(1))
            sm = re.search(r"(\d+) bytes smem", line)
            cur["static_smem"] = int(sm.group(1)) if sm else 0
    return [r for r in rows if r.get("arch") == arch]


def sass_counts(cuobjdump: str, cubin: str) -> dict:
    """{mangled function name: {'HMMA': n, 'FFMA': n, 'DFMA': n}} from the SASS of a cubin."""
    out = subprocess.run([cuobjdump, "--dump-sass", cubin], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"cuobjdump failed on {cubin}: {out.stderr[-2000:]}")
    counts, fn = {}, None
    for line in out.stdout.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            fn = m.group(1)
            counts[fn] = {"HMMA": 0, "FFMA": 0, "DFMA": 0}
            continue
        if fn is None:
            continue
        for op in ("HMMA", "FFMA", "DFMA"):
            if re.search(rf"\b{op}\b", line):
                counts[fn][op] += 1
    return counts


# Dynamic shared memory of the attention kernels: mirrors FwdLayout / BwdLayout in
# csrc/cuda/attention_cuda.cu (keep in sync).
TILES = {"fp16": (32, 64, 32, 64, 2, 4, 8, 4), "bf16": (32, 64, 32, 64, 2, 4, 8, 4),
         "fp32": (32, 64, 32, 32, 4, 4, 1, 1), "fp64": (16, 32, 16, 16, 8, 8, 1, 1)}


def _a128(x: int) -> int:
    return (x + 127) & ~127


def attention_smem(dtype: str, Dc: int, Dp: int, Dv: int) -> dict:
    fm, fn, bm, bn, ts, acc, pt, pa = TILES[dtype]
    dqk, dv = (Dc + Dp + 15) // 16 * 16, (Dv + 15) // 16 * 16
    ldq, ldv = dqk + pt, dv + pt
    # forward
    lds, ldp, ldo = fn + pa, fn + pt, dv + pa
    off = 0
    for size in (fm * ldq * ts, fn * ldq * ts, fn * ldv * ts, fm * lds * acc, fm * ldp * ts, fm * ldo * acc, fm * acc,
                 fm * acc, fn * acc):
        off = _a128(off + size)
    fwd = off

    def bwd(kv: bool) -> int:
        lds, ldp, ldg, ldgv = bn + pa, bn + pt, dqk + pa, dv + pa
        off = 0
        for size in (bm * ldq * ts, bm * ldv * ts, bn * ldq * ts, bn * ldv * ts, bm * lds * acc, bm * lds * acc,
                     bm * ldp * ts, bm * ldp * ts, (bn if kv else bm) * ldg * acc, (bn * ldgv * acc if kv else 0),
                     bm * acc, bm * acc, bn * acc):
            off = _a128(off + size)
        return off

    return {"attn_fwd_kernel": fwd, "attn_bwd_dkdv_kernel": bwd(True), "attn_bwd_dq_kernel": bwd(False)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", default="80,90")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--jobs", type=int, default=int(os.environ.get("MAX_JOBS", "2")))
    args = ap.parse_args()
    archs = [int(a) for a in args.archs.split(",") if a]
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    if not sources:
        print("no .cu sources", file=sys.stderr)
        return 1
    cuobjdump = cuobjdump_path()
    rows, sass = [], {}
    with tempfile.TemporaryDirectory() as tmp, cf.ThreadPoolExecutor(max(1, args.jobs)) as pool:
        futs = {pool.submit(compile_cubin, s, a, tmp): (s, a) for s in sources for a in archs}
        for fut in cf.as_completed(futs):
            src, arch = futs[fut]
            cubin, log = fut.result()
            for r in parse_ptxas(log, arch):
                r["source"] = os.path.relpath(src, ROOT)
                rows.append(r)
            if cuobjdump:
                for fn, c in sass_counts(cuobjdump, cubin).items():
                    sass[(fn, arch)] = c
    names = demangle(sorted({r["mangled"] for r in rows}))
    for r in rows:
        r["kernel"] = short_name(names[r["mangled"]])
        c = sass.get((r["mangled"], r["arch"]))
        if c:
            r.update({f"sass_{k}": v for k, v in c.items()})
    rows.sort(key=lambda r: (r["source"], r["kernel"], r["arch"]))

    problems = []
    for r in rows:
        if r.get("spill_stores", 0) or r.get("spill_loads", 0):
            problems.append(f"{r['kernel']} sm_{r['arch']}: spills {r['spill_stores']}/{r['spill_loads']} bytes")
        if r["kernel"].startswith("attn_") and "delta" not in r["kernel"] and "sass_HMMA" in r:
            half = "fp16" in r["kernel"] or "bf16" in r["kernel"]
            if half and r["sass_HMMA"] == 0:
                problems.append(f"{r['kernel']} sm_{r['arch']}: no HMMA (tensor cores) in SASS")
            if not half and r["sass_HMMA"] > 0:
                problems.append(f"{r['kernel']} sm_{r['arch']}: HMMA in an IEEE fp32/fp64 kernel")
    checked = [r for r in rows if r["kernel"].startswith("attn_") and "sass_HMMA" in r]
    if cuobjdump and not checked:
        problems.append("SASS check found no attention kernels (name parsing?)")
    if not cuobjdump:
        problems.append("no cuobjdump found: SASS (HMMA) check not done")
    smem = {dt: {"dabdetr_32_32_32": attention_smem(dt, 32, 32, 32), "max_64_64_64": attention_smem(dt, 64, 64, 64)}
            for dt in TILES}

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "cuda_resources.json"), "w") as f:
        json.dump({"archs": archs, "cuobjdump": cuobjdump, "kernels": rows, "attention_dynamic_smem_bytes": smem,
                   "problems": problems}, f, indent=1)
    lines = ["# CUDA kernel resources (ptxas -v, SASS)", "",
             f"nvcc flags as setup.py (-O3, C++20); archs {', '.join(f'sm_{a}' for a in archs)}; "
             f"SASS via {cuobjdump or 'n/a (no cuobjdump found)'}.", "",
             "| kernel | source | arch | registers | static smem B | stack B | spill st/ld B | HMMA | FFMA | DFMA |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| `{r['kernel']}` | {os.path.basename(r['source'])} | sm_{r['arch']} | {r.get('registers', '?')} | "
            f"{r.get('static_smem', 0)} | {r.get('stack', '?')} | {r.get('spill_stores', '?')}/{r.get('spill_loads', '?')} | "
            f"{r.get('sass_HMMA', '-')} | {r.get('sass_FFMA', '-')} | {r.get('sass_DFMA', '-')} |")
    lines += ["", "Dynamic shared memory of the attention kernels (bytes; host-computed, per block of 128 threads):", "",
              "| dtype | kernel | Dc/Dp/Dv = 32/32/32 | 64/64/64 |", "|---|---|---|---|"]
    for dt, v in smem.items():
        for k in v["dabdetr_32_32_32"]:
            lines.append(f"| {dt} | `{k}` | {v['dabdetr_32_32_32'][k]} | {v['max_64_64_64'][k]} |")
    lines += ["", "Stack frames of the sine kernels are the slow path (Payne-Hanek) of the accurate sincosf / sincos "
              "for huge angles; they are not register spills.", ""]
    lines += ["## Problems", ""] + ([f"- {p}" for p in problems] if problems else ["none"])
    with open(os.path.join(args.out, "cuda_resources.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
