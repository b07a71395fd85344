"""The C++ CPU kernels under AddressSanitizer + UndefinedBehaviorSanitizer.

    python tests/cpu_asan.py [pytest args]

builds the extension's C++ sources (csrc/ops.cpp, csrc/cpu/*.cpp: the fused ops' CPU kernels, the
backbone's Winograd transforms and layout copy) with ``-fsanitize=address,undefined`` into
``build/cpu_asan/<python>-<torch version>/dabdetr_cpu_asan.so`` and runs the tests that drive them
(``TEST_FILES``: every op against the float64 reference, its gradients, layouts, masks and bad
inputs; the hypothesis fuzz tests; the Winograd transforms at odd sizes; the AVX2 / SSE2 copies of
the kernels (test_cpu_isa.py, in subprocesses that inherit the preload); the model-parity tests) with
that library loaded instead of ``dabdetr._C`` (``DABDETR_LIBRARY``) and libasan preloaded (see
tests/sanitizers.py). A read or write outside a tensor's memory (a tile edge, a stride, a padded
row), a misaligned vector access or a signed overflow ends the run with its source line. `make test`
runs it after the main suite (~1.5 minutes, and ~1.5 more for the build, which is cached).
"""

from __future__ import annotations

import glob
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sanitizers  # noqa: E402

ROOT = sanitizers.ROOT
NAME = "dabdetr_cpu_asan"
TEST_FILES = ["test_ops_attention.py", "test_ops_sine.py", "test_ops_errors.py", "test_ops_fuzz.py",
              "test_winograd.py", "test_cpu_isa.py", "test_model_parity.py"]


def build_directory():
    return ROOT / "build" / "cpu_asan" / sanitizers.build_tag()


def sources():
    return [str(ROOT / "csrc" / "ops.cpp")] + sorted(glob.glob(str(ROOT / "csrc" / "cpu" / "*.cpp")))


def build() -> str:
    """Builds (if needed) and loads the sanitized library; returns its path. Runs in a process with
    the sanitizer runtime preloaded (loading the library needs it)."""
    import torch

    flags = sanitizers.FLAGS + ["-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-Wall", "-Wno-unknown-pragmas"]
    # (cpp_extension.load also loads the library into this process: a check that it loads)
    sanitizers.locked_load(
        build_directory(),
        name=NAME,
        sources=sources(),
        extra_include_paths=[str(ROOT / "csrc")],
        extra_cflags=flags,
        extra_ldflags=sanitizers.LDFLAGS + ["-fopenmp"],
        is_python_module=False,
    )
    path = build_directory() / f"{NAME}.so"
    assert path.exists(), f"no {path} after the build"
    assert hasattr(torch.ops, "dabdetr_winograd"), "the sanitized library registered no Winograd ops"
    return str(path)


def main(pytest_args) -> int:
    env = sanitizers.sanitizer_env()
    if env is None:
        return sanitizers.unavailable("The C++ CPU kernels")
    # build in a child with the runtime preloaded (this process has none, so it cannot load the
    # library), then run the tests with it in place of dabdetr._C
    rc = sanitizers.run([sys.executable, __file__, "--build"], env)
    if rc != 0:
        print("tests/cpu_asan.py: the sanitized build failed", file=sys.stderr)
        return rc
    env["DABDETR_LIBRARY"] = str(build_directory() / f"{NAME}.so")
    env["DABDETR_EXPECT_SANITIZED_LIBRARY"] = "1"
    return sanitizers.run_pytest(TEST_FILES, pytest_args, env)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--build"]:
        print(build(), flush=True)
        sys.exit(0)
    sys.exit(main(sys.argv[1:]))
