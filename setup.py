"""Build and install llama-kernels.

The Triton kernels are pure Python; the C++/CUDA extension in csrc/ joins this
build in a later release.
"""

from pathlib import Path

from setuptools import find_packages, setup

MODELS = ["safetensors>=0.4", "sentencepiece>=0.1.99", "transformers>=4.50"]

setup(
    name="llama-kernels",
    version="0.1.0",
    description="Fused Triton kernels for Llama-family models, centred on Code Llama",
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["llama_kernels", "llama_kernels.*"]),
    package_data={"llama_kernels.ops": ["tuned_configs.json"]},
    install_requires=["torch>=2.4", "triton>=3.2"],
    extras_require={
        # the model's checkpoints (safetensors), tokenizer (sentencepiece) and Hugging Face patch (transformers)
        "models": MODELS,
        # numpy<2.4: triton 3.6's interpreter breaks on numpy 2.4 (runtime-bounded loops).
        "test": ["pytest>=8", "hypothesis>=6", "pytest-benchmark>=4", "numpy<2.4", *MODELS],
        "bench": ["pytest-benchmark>=4", "matplotlib>=3.7"],
    },
    entry_points={"console_scripts": ["llama-kernels=llama_kernels.cli:main"]},
)
