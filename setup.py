"""Build and install llama-kernels: the Triton kernels (pure Python) and the native extension ``llama_kernels._C``.

The extension is built against the torch found at build time, so build it where that torch is
installed: ``pip install --no-build-isolation .`` (as flash-attn does; an isolated build would
fetch a second torch, whose C++ ABI need not match yours). Without torch at build time, the
package installs without the extension and says so; the CPU ops then run ``reference.py``.

- the sources, compile flags and CUDA architectures are csrc/build.json's (CMakeLists.txt reads
  the same file): the CPU kernels and the torch glue are always built, with OpenMP, for the
  compiler's baseline target; the CPU kernels once more per instruction-set path (AVX2 to AMX),
  the path run chosen at run time (csrc/cpu/isa.cpp);
- the CUDA kernels join when torch has CUDA and nvcc is found (``TORCH_CUDA_ARCH_LIST``
  respected, default build.json's list); ``LLAMA_KERNELS_CPU_ONLY=1`` leaves them out;
- ``MAX_JOBS`` bounds ninja's parallel compiles (torch's BuildExtension reads it);
- ``LLAMA_KERNELS_NO_EXTENSION=1`` skips the extension altogether.
"""

import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
MODELS = ["safetensors>=0.4", "sentencepiece>=0.1.99", "transformers>=4.50"]


def native_extension() -> dict:
    """setup() arguments for llama_kernels._C, or {} (with the reason on stderr) when it cannot be built."""
    if os.environ.get("LLAMA_KERNELS_NO_EXTENSION") == "1":
        return {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("llama-kernels: torch is not importable at build time, so the native extension is not built "
              "(install torch first, then pip install --no-build-isolation .)", file=sys.stderr)
        return {}
    with_cuda = (torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
                 and os.environ.get("LLAMA_KERNELS_CPU_ONLY") != "1")
    # The sources, flags and architectures: csrc/build.json, which the CMake build reads too.
    sys.path.insert(0, str(ROOT / "csrc"))
    import build_recipe

    compile_args = {"cxx": [*build_recipe.cxx_flags(with_cuda), "-DLLAMA_KERNELS_PYTHON_MODULE"]}

    class BuildWithIsaPaths(cpp_extension.BuildExtension):
        """torch's build, first compiling the CPU kernels once per instruction-set path (each its own flags and
        folder, through the same ninja) into objects the extension links."""

        def build_extension(self, ext):
            for name, flags in build_recipe.cpu_isa_paths():
                ext.extra_objects += self.compiler.compile(
                    build_recipe.RECIPE["cpu_kernels"], output_dir=str(Path(self.build_temp) / "cpu_isa" / name),
                    include_dirs=ext.include_dirs, extra_postargs={"cxx": [*build_recipe.cxx_flags(False), *flags]})
            super().build_extension(ext)

    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", build_recipe.cuda_arch_list())
        compile_args["nvcc"] = build_recipe.nvcc_flags()
    extension = (cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension)(
        "llama_kernels._C", build_recipe.sources(with_cuda),
        include_dirs=[str(ROOT / build_recipe.RECIPE["include_dir"])], extra_compile_args=compile_args,
        extra_link_args=build_recipe.link_flags())
    return {"ext_modules": [extension],
            "cmdclass": {"build_ext": BuildWithIsaPaths.with_options(use_ninja=True)}}


setup(
    name="llama-kernels",
    version="0.1.0",
    description="Fused Triton kernels for Llama-family models, centred on Code Llama",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["llama_kernels", "llama_kernels.*"]),
    package_data={"llama_kernels.ops": ["tuned_configs.json", "attention_choice.json"]},
    install_requires=["torch>=2.4", "triton>=3.2"],
    extras_require={
        # the model's checkpoints (safetensors), tokenizer (sentencepiece) and Hugging Face patch (transformers)
        "models": MODELS,
        # numpy<2.4: triton 3.6's interpreter breaks on numpy 2.4 (runtime-bounded loops).
        "test": ["pytest>=8", "hypothesis>=6", "pytest-benchmark>=4", "numpy<2.4", *MODELS],
        "bench": ["pytest-benchmark>=4", "matplotlib>=3.7"],
    },
    entry_points={"console_scripts": ["llama-kernels=llama_kernels.cli:main"]},
    **native_extension(),
)
