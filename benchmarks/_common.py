"""Shared helpers for dabdetr's benchmarks: timing, memory, environment info, tables and output.

Used by ``bench_ops.py`` and meant to be reused by the model benchmark. Only the standard library
and torch are imported at module level (no matplotlib, no triton import: its version is read from
the package metadata).

Timing (:func:`measure`)
    Each callable is warmed up, then timed in *samples*; a sample runs the callable ``inner``
    times back to back (``inner`` is chosen so that a sample lasts at least ``target_sample_s``,
    which keeps timer resolution and Python overhead of the timer out of µs-scale ops) and records
    the mean time per call. Samples of the callables being compared are taken round-robin
    (eager, compile, fused, eager, compile, fused, ...), so slow drifts of a shared machine hit
    every provider alike. The garbage collector is disabled while sampling. CPU: ``time.perf_counter``
    around the sample. CUDA: CUDA events recorded around the sample, then ``synchronize`` (so the
    time includes launch gaps when the host is the bottleneck, as it is for tiny ops). L2 is not
    flushed between samples: in the model, an op's inputs come straight from the previous op.
    Reported: median, quartiles (IQR) and minimum of the samples.

Memory
    CPU has no allocator high-water mark; we measure the process's resident-set high-water mark
    (``VmHWM`` in /proc/self/status), reset before the measured region by writing ``5`` to
    /proc/self/clear_refs (Linux ≥ 4.0). Where the reset is not allowed we fall back to
    ``getrusage(RUSAGE_SELF).ru_maxrss``, which is the lifetime peak (then the reported delta is
    only meaningful if the measured region sets a new peak; :func:`rss_peak_reset` says which).
    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
"""

from __future__ import annotations

import datetime
import gc
import json
import math
import os
import platform
import re
import resource
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


# ---------------------------------------------------------------------------------------------
# devices and threads


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def set_threads(n: Optional[int]) -> int:
    """``torch.set_num_threads`` to ``n`` (default: every core this process may use)."""
    n = n or usable_cores()
    torch.set_num_threads(n)
    return n


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------
# timing


@dataclass
class Timing:
    median_ms: float
    p25_ms: float
    p75_ms: float
    min_ms: float
    samples: int  # number of samples
    inner: int  # calls per sample

    @property
    def iqr_ms(self) -> float:
        return self.p75_ms - self.p25_ms

    def as_dict(self) -> dict:
        d = asdict(self)
        d["iqr_ms"] = self.iqr_ms
        return d


def _quantile(xs: Sequence[float], q: float) -> float:
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0]
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass
class SetupAndRun:
    """A measurement whose every call needs untimed preparation: ``run(setup())`` is called and
    only ``run`` is timed (e.g. ``setup`` builds a fresh autograd graph, ``run`` is the backward)."""

    setup: Callable[[], object]
    run: Callable[[object], object]


class _Sampler:
    """Times ``inner`` calls of ``fn`` (back to back, or each after its untimed ``setup`` for a
    :class:`SetupAndRun`); returns seconds per call."""

    def __init__(self, fn, device: str):
        self.fn = fn
        self.cuda = torch.device(device).type == "cuda"
        if self.cuda:
            self.start = torch.cuda.Event(enable_timing=True)
            self.end = torch.cuda.Event(enable_timing=True)

    def _per_call(self, inner: int) -> float:
        setup, run = self.fn.setup, self.fn.run
        total = 0.0
        for _ in range(inner):
            state = setup()
            if self.cuda:
                self.start.record()
                run(state)
                self.end.record()
                self.end.synchronize()
                total += self.start.elapsed_time(self.end) / 1e3
            else:
                t0 = time.perf_counter()
                run(state)
                total += time.perf_counter() - t0
            del state
        return total / inner

    def __call__(self, inner: int) -> float:
        fn = self.fn
        if isinstance(fn, SetupAndRun):
            return self._per_call(inner)
        if self.cuda:
            torch.cuda.synchronize()
            self.start.record()
            for _ in range(inner):
                fn()
            self.end.record()
            self.end.synchronize()
            return self.start.elapsed_time(self.end) / 1e3 / inner
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        return (time.perf_counter() - t0) / inner


def measure(
    fns: Dict[str, "Callable[[], object] | SetupAndRun"],
    device: str,
    *,
    min_time: float = 1.0,
    min_samples: int = 7,
    max_samples: int = 200,
    iters: Optional[int] = None,
    warmup: int = 3,
    target_sample_s: float = 2e-3,
    max_inner: int = 1000,
    inner: Optional[int] = None,
) -> Dict[str, Timing]:
    """Time several callables round-robin (see the module docstring).

    ``iters``: exactly this many samples per callable (overrides ``min_time``/``min/max_samples``).
    Otherwise sampling goes on until every callable has ``min_samples`` samples and ``min_time``
    seconds of samples, or ``max_samples`` samples.
    ``inner``: calls per sample for every callable, instead of estimating it from three extra
    calls (for callables that take seconds, e.g. a model's train step); ``warmup`` may then be 0.
    """
    samplers = {k: _Sampler(f, device) for k, f in fns.items()}
    calls: Dict[str, int] = {}  # calls per sample
    for name, s in samplers.items():
        if inner is not None:
            for _ in range(warmup):
                s(1)
            calls[name] = max(1, int(inner))
            continue
        for _ in range(max(1, warmup)):
            s(1)
        est = min(s(1) for _ in range(3))
        calls[name] = int(min(max_inner, max(1, math.ceil(target_sample_s / max(est, 1e-9)))))
    times: Dict[str, List[float]] = {k: [] for k in fns}
    spent: Dict[str, float] = {k: 0.0 for k in fns}
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        rounds = 0
        while True:
            for name, s in samplers.items():
                t = s(calls[name])
                times[name].append(t)
                spent[name] += t * calls[name]
            rounds += 1
            if iters is not None:
                if rounds >= iters:
                    break
            elif rounds >= max_samples or (
                rounds >= min_samples and all(v >= min_time for v in spent.values())
            ):
                break
    finally:
        if was_enabled:
            gc.enable()
    out = {}
    for name, ts in times.items():
        ms = [t * 1e3 for t in ts]
        out[name] = Timing(
            median_ms=statistics.median(ms),
            p25_ms=_quantile(ms, 0.25),
            p75_ms=_quantile(ms, 0.75),
            min_ms=min(ms),
            samples=len(ms),
            inner=calls[name],
        )
    return out


def time_once(fn: Callable[[], object], device: str) -> float:
    """Wall time of one call in seconds (synchronized on CUDA)."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# roofline: measured peaks of this device


def device_peaks(device: str, dtype: torch.dtype, *, quick: bool = False, reps: int = 9) -> Dict[str, object]:
    """Measured (not datasheet) peaks to put achieved rates in proportion, once per run:

    * ``copy_gbps``: ``y.copy_(x)`` of a large float32 tensor (CUDA 1 GiB, CPU 256 MiB; ``quick``:
      32 MiB), bytes read + written per second (GB/s = 1e9 B/s).
    * ``matmul_gflops``: ``torch.mm`` of two square ``dtype`` matrices (CUDA n = 8192, CPU n = 2048;
      ``quick``: 512), ``2·n³`` flops per call, in GFLOP/s (float32 on CUDA: TF32 as torch's
      current setting, off by default).

    The fastest of ``reps`` calls after one warm-up (``measure``'s timers, all threads of this
    process): a peak is what the device can do, and on a shared machine the median of a few calls
    moves with the neighbours' load (the 2-core VM's 2048² matmul: median 153 in one run, 184
    GFLOP/s in another the same day; the medians are kept as ``*_median``).
    """
    cuda = torch.device(device).type == "cuda"
    nbytes = (32 << 20) if quick else ((1 << 30) if cuda else (256 << 20))
    n = 512 if quick else (8192 if cuda else 2048)
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    y = torch.zeros_like(x)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    t = measure({"copy": lambda: y.copy_(x), "mm": lambda: torch.mm(a, b)}, device, iters=reps, warmup=1, inner=1)
    del x, y, a, b
    return {
        "copy_gbps": 2 * nbytes / (t["copy"].min_ms / 1e3) / 1e9,
        "copy_gbps_median": 2 * nbytes / (t["copy"].median_ms / 1e3) / 1e9,
        "copy_bytes": nbytes,
        "matmul_gflops": 2.0 * n ** 3 / (t["mm"].min_ms / 1e3) / 1e9,
        "matmul_gflops_median": 2.0 * n ** 3 / (t["mm"].median_ms / 1e3) / 1e9,
        "matmul_n": n,
        "matmul_dtype": str(dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "method": f"measured: y.copy_(x) float32 (read + write bytes), torch.mm n x n (2 n^3 flops); fastest of {reps}",
    }


# ---------------------------------------------------------------------------------------------
# memory


def meminfo() -> Dict[str, int]:
    """/proc/meminfo in bytes (empty dict where unavailable)."""
    out = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, rest = line.split(":", 1)
                parts = rest.split()
                if parts:
                    out[key] = int(parts[0]) * (1024 if len(parts) > 1 and parts[1] == "kB" else 1)
    except OSError:
        pass
    return out


def cgroup_memory_limit() -> Optional[int]:
    """The cgroup (v2 or v1) memory limit of this process in bytes, or None if unlimited/unknown."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text and text != "max":
            value = int(text)
            if value < (1 << 60):
                return value
    return None


def host_memory_budget() -> Dict[str, Optional[int]]:
    """Total / available memory of the machine and the cgroup limit, in bytes."""
    mi = meminfo()
    limit = cgroup_memory_limit()
    total = mi.get("MemTotal")
    if limit is not None and total is not None:
        total_eff = min(total, limit)
    else:
        total_eff = total if total is not None else limit
    return {
        "mem_total": mi.get("MemTotal"),
        "mem_available": mi.get("MemAvailable"),
        "cgroup_limit": limit,
        "budget_total": total_eff,
    }


def _status_field(name: str) -> Optional[int]:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{name}:\s+(\d+)\s+kB", text, re.M)
    return int(m.group(1)) * 1024 if m else None


def rss_bytes() -> Optional[int]:
    return _status_field("VmRSS")


def vm_size_bytes() -> Optional[int]:
    return _status_field("VmSize")


def rss_peak_reset() -> bool:
    """Reset the process's RSS high-water mark (VmHWM). False if the kernel refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_peak_bytes() -> int:
    """VmHWM (resettable) if available, else ru_maxrss (lifetime peak; kB on Linux)."""
    hwm = _status_field("VmHWM")
    if hwm is not None:
        return hwm
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


class PeakMemory:
    """Context manager: peak memory above the level at entry, in bytes (``.peak``).

    CUDA: ``max_memory_allocated`` (tensor bytes of the caching allocator). CPU: RSS high-water
    mark (everything the process touches: tensors, allocator slack, thread stacks); ``.method``
    names what was measured.
    """

    def __init__(self, device: str):
        self.cuda = torch.device(device).type == "cuda"
        self.peak = 0
        self.method = ""

    def __enter__(self):
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            self.method = "torch.cuda.max_memory_allocated() - memory_allocated() at start"
        else:
            reset = rss_peak_reset()
            self.base = rss_bytes() or 0
            self.method = (
                "VmHWM (reset via /proc/self/clear_refs) - VmRSS at start"
                if reset
                else "ru_maxrss (lifetime peak, could not reset) - VmRSS at start: a lower bound"
            )
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.peak = max(0, rss_peak_bytes() - self.base)
        return False


# ---------------------------------------------------------------------------------------------
# environment


def _read_cpu_model() -> Optional[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


MALLOC_CHOICES = ("retain", "default")
MALLOC_HELP = ("CPU: retain = glibc keeps freed memory for reuse (dabdetr.cpu_memory, what `dabdetr train` does; "
               "default), default = glibc's own policy (freed blocks over its mmap threshold go back to the "
               "kernel and are page-faulted in again, which costs the providers with larger temporaries more)")


def apply_malloc_policy(device: str, mode: str) -> str:
    """The ``--malloc`` option of the benchmarks, applied to this process before anything is
    measured (every provider alike): ``"retain"`` on the CPU calls
    :func:`dabdetr.cpu_memory.retain_freed_memory`. Returns the policy in force, for the results."""
    if mode not in MALLOC_CHOICES:
        raise ValueError(f"--malloc must be one of {MALLOC_CHOICES}, not {mode!r}")
    if mode == "default" or torch.device(device).type != "cpu":
        return "default"
    from dabdetr.cpu_memory import retain_freed_memory

    return "retain" if retain_freed_memory() else "default (retain unavailable: not glibc)"


def cpu_capability() -> Optional[str]:
    """torch's CPU capability (``"AVX512"``, ``"AVX2"``, ``"DEFAULT"``...), or None if unknown."""
    try:
        return torch.backends.cpu.get_cpu_capability()
    except Exception:  # pragma: no cover - older torch
        return None


def cpu_label(env: Dict[str, object]) -> str:
    """"AMD EPYC, AVX512" for a results header (the capability only where recorded)."""
    return ", ".join(str(x) for x in (env.get("cpu_model"), env.get("cpu_capability")) if x)


def _pkg_version(name: str) -> Optional[str]:
    try:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version(name)
        except PackageNotFoundError:
            return None
    except ImportError:  # pragma: no cover
        return None


def git_info(root: Path = REPO_ROOT) -> Dict[str, object]:
    """sha and dirty flag of the checkout (read-only git commands; None outside a repository)."""

    def run(*args) -> Optional[str]:
        try:
            r = subprocess.run(
                ["git", "--no-optional-locks", "-C", str(root), *args],
                capture_output=True, text=True, timeout=20,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    sha = run("rev-parse", "HEAD")
    if sha is None:
        return {"sha": None, "dirty": None}
    status = run("status", "--porcelain", "--untracked-files=no")
    return {"sha": sha, "dirty": bool(status) if status is not None else None}


def load_average() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def busy_warning() -> Optional[str]:
    """A warning when other processes keep the CPUs busy (timings then are unreliable, and
    OpenMP-parallel ops lose whole scheduler time slices at their barriers)."""
    la = load_average()
    if la and la[0] > 0.5:
        return (f"the 1-minute load average is {la[0]:.2f} on {usable_cores()} usable cores before we start: "
                "other processes are running, timings will be noisy (parallel ops suffer most)")
    return None


def cuda_driver_info() -> Dict[str, Optional[str]]:
    """The installed NVIDIA driver: the CUDA version its ``libcuda`` supports (``cuDriverGetVersion``,
    e.g. "13.0") and the kernel module's version (``/proc/driver/nvidia/version``); None for what
    cannot be read (no driver, another OS)."""
    info: Dict[str, Optional[str]] = {"cuda_driver_api": None, "nvidia_driver": None}
    try:
        import ctypes

        lib = ctypes.CDLL("libcuda.so.1")
        v = ctypes.c_int(0)
        if lib.cuDriverGetVersion(ctypes.byref(v)) == 0 and v.value > 0:
            info["cuda_driver_api"] = f"{v.value // 1000}.{(v.value % 1000) // 10}"
    except (OSError, AttributeError):
        pass
    try:
        info["nvidia_driver"] = nvidia_driver_version(Path("/proc/driver/nvidia/version").read_text())
    except OSError:
        pass
    return info


def nvidia_driver_version(text: str) -> Optional[str]:
    """The version in the text of ``/proc/driver/nvidia/version`` (proprietary or open module)."""
    m = re.search(r"Kernel Module\s+(?:for \S+\s+)?([0-9]+(?:\.[0-9]+)+)", text)
    return m.group(1) if m else None


def environment(device: str, extra: Optional[dict] = None) -> Dict[str, object]:
    """Machine, versions, git state, date and command line, for results files."""
    dev = torch.device(device)
    env: Dict[str, object] = {
        "hostname": socket.gethostname(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "argv": list(sys.argv),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _pkg_version("triton"),
        "numpy": _pkg_version("numpy"),
        "cpu_model": _read_cpu_model(),
        # the vector ISA torch's kernels (and oneDNN's) dispatch to: the same "AMD EPYC" name covers
        # AVX2 and AVX-512 machines here, whose convolution and matmul rates differ by ~1.5x
        "cpu_capability": cpu_capability(),
        "cpu_count": os.cpu_count(),
        "usable_cores": usable_cores(),
        "torch_threads": torch.get_num_threads(),
        "mem_total_bytes": meminfo().get("MemTotal"),
        "load_average": load_average(),
        "git": git_info(),
        "device": str(dev),
    }
    try:
        import dabdetr
        from dabdetr import _ext

        env["dabdetr"] = getattr(dabdetr, "__version__", None) or _pkg_version("dabdetr")
        env["dabdetr_extension"] = {"loaded": _ext.LOADED, "error": _ext.LOAD_ERROR}
    except Exception as exc:  # pragma: no cover - benchmarks must still report
        env["dabdetr"] = f"import failed: {exc!r}"
    if dev.type == "cuda" and torch.cuda.is_available():
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        env["gpu"] = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "total_memory_bytes": props.total_memory,
            "multiprocessors": props.multi_processor_count,
            "cuda_toolkit": torch.version.cuda,  # the CUDA torch was built with
            **cuda_driver_info(),
            "allow_tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "allow_tf32_cudnn": torch.backends.cudnn.allow_tf32,
        }
    if extra:
        env.update(extra)
    return env


def machine_tag(device: str) -> str:
    """GPU name on CUDA, else the hostname; safe for file names."""
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name()
    else:
        name = socket.gethostname()
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-").lower() or "unknown"


# ---------------------------------------------------------------------------------------------
# output


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]], align: Optional[str] = None) -> str:
    """A GitHub Markdown table; ``align`` is one char per column: l, r or c."""
    rows = [["" if c is None else str(c) for c in r] for r in rows]
    widths = [len(h) for h in headers]
    for r in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, r)]
    align = align or "l" * len(headers)

    def fmt(cells):
        out = []
        for c, w, a in zip(cells, widths, align):
            out.append(c.rjust(w) if a == "r" else c.center(w) if a == "c" else c.ljust(w))
        return "| " + " | ".join(out) + " |"

    sep = []
    for w, a in zip(widths, align):
        w = max(w, 3)
        sep.append(("-" * (w - 1) + ":") if a == "r" else (":" + "-" * (w - 2) + ":") if a == "c" else "-" * w)
    return "\n".join([fmt(headers), "| " + " | ".join(sep) + " |"] + [fmt(r) for r in rows])


def write_json(path: Path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1, default=str)
        f.write("\n")
    os.replace(tmp, path)
    return path


def write_csv(path: Path, rows: List[dict]) -> Path:
    import csv

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keys: List[str] = []
    for r in rows:
        for k in r:
            if k not in keys:
                keys.append(k)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in r.items()})
    return path


def fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "?"
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def fmt_x(ratio: Optional[float]) -> str:
    """A speedup as ``1.23x`` (``—`` when unknown)."""
    return f"{ratio:.2f}x" if ratio is not None else "—"


def log(msg: str) -> None:
    """Progress messages go to stderr so that stdout stays a clean Markdown report."""
    print(msg, file=sys.stderr, flush=True)
