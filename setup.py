"""Builds dabdetr and its extension dabdetr._C.

The C++ CPU kernels (csrc/ops.cpp, csrc/cpu/*.cpp) are always built. The CUDA kernels
(csrc/cuda/*.cu) are built when torch has CUDA and nvcc is found; DABDETR_BUILD_CUDA=1 forces
them (an error if impossible), DABDETR_BUILD_CUDA=0 skips them. Without a GPU set
TORCH_CUDA_ARCH_LIST (default here: "8.0;9.0+PTX": A100 and H100/H200 machine code, plus sm_90 PTX
that the driver compiles for newer GPUs on first use).

Install with `pip install -e . --no-build-isolation` (build isolation would pull a second torch).
"""

import glob
import os
import shutil
import sys
import sysconfig

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _cuda_wanted():
    flag = os.environ.get("DABDETR_BUILD_CUDA", "").strip()
    cu_sources = glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))
    if flag == "0":
        return False, cu_sources
    import torch
    from torch.utils import cpp_extension

    has_nvcc = cpp_extension.CUDA_HOME is not None and (
        shutil.which("nvcc") is not None
        or os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"))
    )
    possible = torch.version.cuda is not None and has_nvcc and bool(cu_sources)
    if flag == "1" and not possible:
        raise RuntimeError(
            "DABDETR_BUILD_CUDA=1 but the CUDA kernels cannot be built: "
            f"torch.version.cuda={torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME}, "
            f"{len(cu_sources)} .cu files"
        )
    return possible, cu_sources


def _extensions():
    if os.environ.get("CUDA_HOME") is None and os.path.exists("/usr/local/cuda/bin/nvcc"):
        # torch's auto-detection picks /usr/local when nvcc is /usr/local/bin/nvcc.
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    sources = _rel([os.path.join(ROOT, "csrc", "ops.cpp")] + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    debug = os.environ.get("DABDETR_DEBUG", "0") == "1"
    cxx = ["-O0", "-g"] if debug else ["-O3", "-fno-math-errno", "-fno-trapping-math"]
    cxx += ["-fopenmp", "-Wall", "-Wno-unknown-pragmas"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    build_cuda, cu_sources = _cuda_wanted()
    kwargs = dict(extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"], include_dirs=include_dirs)
    if not build_cuda:
        return [CppExtension("dabdetr._C", sources, **kwargs)]
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    # cuBLAS / cuSPARSE headers that ATen/cuda includes live in the nvidia pip wheels.
    purelib = sysconfig.get_paths()["purelib"]
    include_dirs += sorted(glob.glob(os.path.join(purelib, "nvidia", "*", "include")))
    kwargs["extra_compile_args"]["nvcc"] = [
        "-O3",
        "--expt-relaxed-constexpr",
        "-lineinfo",
        "-Xptxas=-warn-spills",  # a register spill shows as a warning in every build log
    ] + (["-Xptxas", "-v"] if os.environ.get("DABDETR_PTXAS_VERBOSE") == "1" else [])
    kwargs["extra_compile_args"]["cxx"].append("-DDABDETR_WITH_CUDA")
    return [CUDAExtension("dabdetr._C", sources + _rel(cu_sources), **kwargs)]


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


if __name__ == "__main__" or "setuptools" in sys.modules:
    setup(
        packages=[
            "dabdetr",
            "dabdetr.ops",
            "dabdetr.nn",
            "dabdetr.models",
            "dabdetr.data",
            "dabdetr.kernels",
        ],
        package_dir={"dabdetr.kernels": "kernels"},
        ext_modules=_extensions(),
        cmdclass=_cmdclass(),
    )
