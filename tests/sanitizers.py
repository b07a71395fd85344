"""AddressSanitizer + UndefinedBehaviorSanitizer builds of dabdetr's C++ code, for the tests.

Two users: ``tests/cuda_emu.py --asan`` (the CUDA kernels on the CPU emulator) and
``tests/cpu_asan.py`` (the C++ CPU kernels). Both build their library with ``FLAGS`` through
``torch.utils.cpp_extension`` (``locked_load``) and run pytest in a child process that has libasan
(and libstdc++) preloaded (``run_pytest``): every read or write outside memory torch allocated,
every vector access through a misaligned pointer and every signed overflow ends the run with the
source line. Python and torch are not instrumented.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]

# -O1: ASan's recommendation (reports with usable stacks, a few times slower than -O2)
FLAGS = ["-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
LDFLAGS = ["-fsanitize=address,undefined"]


def build_tag() -> str:
    """Python and torch version (a library built for another one's ABI must not be loaded, nor
    rebuilt back and forth when two stacks share the checkout), e.g. py3.11-torch2.14.1."""
    return f"py{sys.version_info[0]}.{sys.version_info[1]}-torch{torch.__version__.split('+')[0]}"


def locked_load(build_dir: Path, **kwargs) -> object:
    """``cpp_extension.load(build_directory=build_dir, **kwargs)``, one build at a time per directory
    under our own lock (the kernel drops it if we die). Inside it a file named ``lock`` can only
    be a leftover: torch >= 2.14 leaves its (advisory) lock file behind, and torch < 2.14 waits,
    forever, for any such file to go (a killed build leaves one)."""
    from torch.utils import cpp_extension

    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir / "dabdetr_build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            (build_dir / "lock").unlink()
        except FileNotFoundError:
            pass
        return cpp_extension.load(build_directory=str(build_dir), verbose=False, **kwargs)


def compiler_lib(name: str) -> Optional[str]:
    """The host compiler's runtime library ``name`` (e.g. libasan.so), or None."""
    for cc in (os.environ.get("CXX"), "c++", "g++"):
        if not cc or shutil.which(cc) is None:
            continue
        try:
            path = subprocess.run([cc, f"-print-file-name={name}"], capture_output=True, text=True,
                                  check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            continue
        if os.path.isabs(path) and os.path.exists(path):
            return path
    return None


def sanitizer_env(extra: Optional[dict] = None) -> Optional[dict]:
    """The environment of a process with the sanitizer runtime preloaded, or None without libasan /
    libstdc++ from the host compiler."""
    lib = compiler_lib("libasan.so")
    # libstdc++ preloaded too: python does not link it, and without it ASan's __cxa_throw
    # interceptor finds no real __cxa_throw (any C++ exception, e.g. in Triton's import, then aborts)
    cxx = compiler_lib("libstdc++.so")
    if lib is None or cxx is None:
        return None
    env = dict(os.environ)
    env["LD_PRELOAD"] = f"{lib} {cxx}"
    # Python and torch are not instrumented: leaks at exit are theirs; halt on the first error.
    env["ASAN_OPTIONS"] = "detect_leaks=0:halt_on_error=1:" + env.get("ASAN_OPTIONS", "")
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1:" + env.get("UBSAN_OPTIONS", "")
    env.update(extra or {})
    return env


def run(cmd: Sequence[str], env: dict) -> int:
    shown = {k: env[k] for k in env if k not in os.environ or os.environ[k] != env[k]}
    print("+", " ".join(f"{k}='{v}'" for k, v in shown.items()), " ".join(cmd), flush=True)
    return subprocess.call(list(cmd), env=env, cwd=str(ROOT))


def run_pytest(test_files: Sequence[str], pytest_args: Sequence[str], env: dict) -> int:
    """pytest on ``test_files`` in a process with ``env`` (from sanitizer_env)."""
    # --capture=sys: the sanitizers report on fd 2 and end the process; fd capture would swallow it
    cmd = [sys.executable, "-m", "pytest", "-q", "--capture=sys", "-p", "no:cacheprovider",
           *[str(ROOT / "tests" / f) for f in test_files], *pytest_args]
    return run(cmd, env)


def required() -> bool:
    """CI (DABDETR_REQUIRE_SANITIZERS=1): a missing sanitizer runtime fails instead of skipping."""
    return os.environ.get("DABDETR_REQUIRE_SANITIZERS", "0") == "1"


def unavailable(what: str) -> int:
    """Exit status when the sanitizer runtime is missing: 1 in CI, else 0 (skipped, said why)."""
    msg = f"{what} under AddressSanitizer: no libasan / libstdc++ from the host compiler"
    if required():
        print(f"{msg} (DABDETR_REQUIRE_SANITIZERS=1)", file=sys.stderr)
        return 1
    print(f"{msg}; skipped", file=sys.stderr)
    return 0
