"""csrc/build.json (the extension's one build recipe, which CMakeLists.txt reads too) as the arguments of the Python
builds: setup.py's and bench/gpu_extension.py's. Plain Python, no torch: setup.py imports it before torch."""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

RECIPE = json.loads(Path(__file__).with_name("build.json").read_text())
# The torch glue's CUDA parts (csrc/torch/cuda_ops.cpp, bindings.cpp) compile only with it.
WITH_CUDA = "-DLLAMA_KERNELS_WITH_CUDA"


def sources(with_cuda: bool) -> list[str]:
    """The extension's sources compiled once, with cxx_flags, relative to the repository root; the CPU kernels, compiled
    once per instruction-set path, join them as objects (cpu_isa_paths)."""
    return [*RECIPE["cpu_dispatch"], *RECIPE["torch_glue"], *(RECIPE["cuda_kernels"] if with_cuda else [])]


def cpu_isa_paths() -> list[tuple[str, list[str]]]:
    """(name, the flags its kernels add to cxx_flags) per instruction-set path: what it and every path before it
    add, and the macro naming it (csrc/cpu/isa.h)."""
    paths, flags = [], []
    for path in RECIPE["cpu_isa_paths"]:
        flags = [*flags, *path["adds"]]
        paths.append((path["name"], [*flags, f"-DLLAMA_KERNELS_ISA_PATH={path['name']}"]))
    return paths


def compile_cpu_kernels(root: Path, out_dir: Path, jobs: int, compiler: str = "c++") -> list[str]:
    """The CPU kernels compiled once per path by `compiler` (they need no torch headers), for a build that takes
    objects (bench/gpu_extension.py's cpp_extension.load; setup.py compiles them through torch's ninja instead)."""
    commands = []
    for name, flags in cpu_isa_paths():
        for source in RECIPE["cpu_kernels"]:
            obj = out_dir / name / (Path(source).stem + ".o")
            obj.parent.mkdir(parents=True, exist_ok=True)
            commands.append([compiler, *cxx_flags(with_cuda=False), *flags, "-fPIC",
                             f"-I{root / RECIPE['include_dir']}", "-c", str(root / source), "-o", str(obj)])
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(lambda command: subprocess.run(command, check=True), commands))
    return [command[-1] for command in commands]


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
