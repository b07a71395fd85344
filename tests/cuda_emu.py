"""Builds and loads the CUDA kernels for the CPU emulator (csrc/emu; tests only).

``csrc/emu/*_emu.cpp`` compile the real ``csrc/cuda/*.cu`` with the host compiler and
``DABDETR_CUDA_EMULATION`` defined, on top of ``csrc/emu/cuda_emu.h`` (an emulator of the CUDA
execution model: threads as fibers, barriers, warp shuffles, WMMA, shared memory), and register
them as CPU ops ``torch.ops.dabdetr_cuda_emu.*`` with the CUDA kernels' arguments. The build
needs a CUDA toolkit's headers (cuda_runtime.h, cuda_fp16.h, cuda_bf16.h; not its compiler) and
takes ~10-30 s; it is cached in ``build/cuda_emu/<python>-<torch version>``.

Without the headers the emulation tests skip, unless ``DABDETR_REQUIRE_CUDA_EMULATION=1`` (CI sets
it): then they fail. A compile error always fails them.

Under AddressSanitizer (global-memory bounds, which the emulator itself does not check: every
tensor torch allocates then has red zones) and UndefinedBehaviorSanitizer (e.g. every vector load or
store through a misaligned pointer, a fault on the GPU; signed overflow in index arithmetic):
``python tests/cuda_emu.py --asan [pytest args]`` runs tests/test_cuda_emulated.py in a process
with libasan preloaded and the library built with ``-fsanitize=address,undefined`` (any finding
ends the process; ``DABDETR_CUDA_EMU_ASAN=1``, cached in ``build/cuda_emu_asan/...``); `make test`
does so after the main suite.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sanitizers  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [ROOT / "csrc" / "emu" / f for f in ("attention_emu.cpp", "sine_emu.cpp", "selftest_emu.cpp")]
BUILD_DIR = ROOT / "build" / "cuda_emu"
ASAN_BUILD_DIR = ROOT / "build" / "cuda_emu_asan"
ASAN_ENV = "DABDETR_CUDA_EMU_ASAN"
REQUIRED_HEADERS = ("cuda_runtime.h", "cuda_fp16.h", "cuda_bf16.h", os.path.join("crt", "host_config.h"))

_state = {"loaded": False, "error": None}


def cuda_include_dir() -> Optional[str]:
    """A directory with the CUDA toolkit's host headers, or None."""
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        roots.append(str(Path(os.path.realpath(nvcc)).parents[1]))
    roots += sorted(glob.glob("/usr/local/cuda-*"))
    for root in roots:
        if not root:
            continue
        inc = os.path.join(root, "include")
        if all(os.path.exists(os.path.join(inc, h)) for h in REQUIRED_HEADERS):
            return inc
    return None


def required() -> bool:
    return os.environ.get("DABDETR_REQUIRE_CUDA_EMULATION", "0") == "1"


def asan() -> bool:
    """Whether this process builds / loads the AddressSanitizer variant (libasan must be preloaded)."""
    return os.environ.get(ASAN_ENV, "0") == "1"


def load() -> Optional[str]:
    """Builds (if needed) and loads the emulation library; returns None on success, else why the
    CUDA toolkit's headers are missing. Raises on a build error."""
    if _state["loaded"]:
        return None
    if _state["error"] is not None:
        return _state["error"]
    inc = cuda_include_dir()
    if inc is None:
        _state["error"] = (
            "no CUDA toolkit headers (cuda_runtime.h, cuda_fp16.h, cuda_bf16.h) under CUDA_HOME, "
            "/usr/local/cuda or nvcc's prefix"
        )
        return _state["error"]
    build_dir = build_directory()
    sanitized = asan()
    sanitizers.locked_load(
        build_dir,
        name="dabdetr_cuda_emu",
        sources=[str(s) for s in SOURCES],
        extra_include_paths=[str(ROOT / "csrc"), inc],
        extra_cflags=sanitizers.FLAGS if sanitized else ["-O2"],
        extra_ldflags=sanitizers.LDFLAGS if sanitized else None,
        is_python_module=False,
    )
    _state["loaded"] = True
    return None


def build_directory() -> Path:
    """The build cache: per sanitizer setting, Python version and torch version, e.g.
    build/cuda_emu/py3.11-torch2.14.1."""
    return (ASAN_BUILD_DIR if asan() else BUILD_DIR) / sanitizers.build_tag()


def ops():
    return torch.ops.dabdetr_cuda_emu


def run_asan(pytest_args) -> int:
    """tests/test_cuda_emulated.py in a process with libasan preloaded and the sanitized library
    (AddressSanitizer + UndefinedBehaviorSanitizer)."""
    env = sanitizers.sanitizer_env({ASAN_ENV: "1"})
    if env is None:
        return sanitizers.unavailable("CUDA emulation")
    return sanitizers.run_pytest(["test_cuda_emulated.py"], pytest_args, env)


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "--asan":
        sys.exit(run_asan(sys.argv[2:]))
    print("usage: python tests/cuda_emu.py --asan [pytest args]", file=sys.stderr)
    sys.exit(2)
