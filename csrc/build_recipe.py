"""csrc/build.json (the extension's one build recipe, which CMakeLists.txt reads too) as the arguments of the Python
builds: setup.py's and bench/gpu_extension.py's. Plain Python, no torch: setup.py imports it before torch."""

from __future__ import annotations

import json
from pathlib import Path

RECIPE = json.loads(Path(__file__).with_name("build.json").read_text())
# The torch glue's CUDA parts (csrc/torch/cuda_ops.cpp, bindings.cpp) compile only with it.
WITH_CUDA = "-DLLAMA_KERNELS_WITH_CUDA"


def sources(with_cuda: bool) -> list[str]:
    """The extension's sources, relative to the repository root."""
    return [*RECIPE["cpu_kernels"], *RECIPE["torch_glue"], *(RECIPE["cuda_kernels"] if with_cuda else [])]


def cxx_flags(with_cuda: bool) -> list[str]:
    return [f"-std=c++{RECIPE['cxx_standard']}", *RECIPE["cxx_flags"], *([WITH_CUDA] if with_cuda else [])]


def nvcc_flags() -> list[str]:
    return [f"-std=c++{RECIPE['cuda_standard']}", *RECIPE["cuda_flags"], WITH_CUDA]


def link_flags() -> list[str]:
    return list(RECIPE["link_flags"])


def cuda_arch_list() -> str:
    """The architectures in TORCH_CUDA_ARCH_LIST's form: "8.0 9.0a"."""
    return " ".join(RECIPE["cuda_archs"])


def gencode_flags() -> list[str]:
    """nvcc's -gencode flags for the architectures, for a compile outside torch's build (arch 9.0a -> sm_90a)."""
    archs = [arch.replace(".", "") for arch in RECIPE["cuda_archs"]]
    return [flag for arch in archs for flag in ("-gencode", f"arch=compute_{arch},code=sm_{arch}")]


if __name__ == "__main__":  # `python csrc/build_recipe.py`: the C++ flags of a CUDA build (the Makefile's glue check)
    print(" ".join(cxx_flags(with_cuda=True)))
