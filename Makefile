# Two entry points, each installing what it needs into a project virtualenv first:
#   make bench   the main job: llama-kernels bench on whatever device is present
#   make test    the test suite: Triton kernels under the interpreter on CPU, the native
#                extension (built by setup.py) against the reference, the ahead-of-time
#                compile for sm_80/sm_90, the benchmark's smoke run, and the CMake build:
#                its C++ tests (ctest), the nvcc compile check of every CUDA file and of
#                their torch glue against a CUDA torch's headers; the C++ kernels' tests again on
#                the AVX2 path (test-avx2)
# TORCH and TRITON can be overridden, e.g. make test TORCH=torch==2.11.0.

PYTHON ?= python3
TORCH ?= torch==2.13.0
# The GPU check machines run triton 3.6: testing and compiling with it here checks what the
# card will run. The interpreter tests run again on a newer triton (NEWER_TRITON), pinned so
# that CI stays reproducible, to catch what newer releases removed.
TRITON ?= triton==3.6.0
NEWER_TRITON ?= triton==3.9.0

VENV := .venv
NEWER_VENV := .venv-newer-triton

.PHONY: install test test-newer-triton test-avx2 cmake-check cuda-glue-check bench clean
CSRC := $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu csrc/*/*.cuh) csrc/build.json csrc/build_recipe.py

install: $(VENV)/.installed

# $(1): the virtualenv, $(2): the triton requirement, $(3): variables for the package install
define make_venv
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install --quiet --upgrade pip
	$(1)/bin/python -m pip install --quiet "$(TORCH)" "$(2)" "setuptools>=64" wheel ninja
	$(3) $(1)/bin/python -m pip install --quiet --no-build-isolation -e ".[test,bench]"
	touch $(1)/.installed
endef

# Both venvs install the package editable without compiling; the extension is built once, into the checkout
# (llama_kernels/_C*.so), by the rule below, and both venvs (the same torch) import that build.
$(VENV)/.installed: setup.py pyproject.toml Makefile
	$(call make_venv,$(VENV),$(TRITON),LLAMA_KERNELS_NO_EXTENSION=1)

$(NEWER_VENV)/.installed: setup.py pyproject.toml Makefile
	$(call make_venv,$(NEWER_VENV),$(NEWER_TRITON),LLAMA_KERNELS_NO_EXTENSION=1)

# Builds the extension in place, again when a C++/CUDA source changes (ninja recompiles only what changed).
$(VENV)/.extension: $(VENV)/.installed $(CSRC)
	MAX_JOBS=$${MAX_JOBS:-2} $(VENV)/bin/python setup.py --quiet build_ext --inplace
	touch $@

test: $(VENV)/.extension test-newer-triton test-avx2 cmake-check
	$(VENV)/bin/python -m pytest tests

# The C++ kernels' Python tests with the CPU kernels forced onto the narrowest path (csrc/cpu/isa.h); every other run
# takes this CPU's widest: the extension's own tests and the op tests' native-backend cases (-m extension).
NATIVE_TESTS := $(addprefix tests/test_,rms_norm.py rope.py attention.py decode.py decode_paged.py swiglu.py \
                  cross_entropy.py)
test-avx2: $(VENV)/.extension
	LLAMA_KERNELS_CPU_ISA=avx2 $(VENV)/bin/python -m pytest -q tests/test_native.py
	LLAMA_KERNELS_CPU_ISA=avx2 $(VENV)/bin/python -m pytest -q -m extension $(NATIVE_TESTS)

# What a newer triton can break: the tests that run the Triton kernels (under the interpreter). The model, patch,
# checkpoint, CLI and benchmark tests run on the pinned triton only.
TRITON_TESTS := $(addprefix tests/test_,rms_norm.py rope.py attention.py decode.py decode_paged.py swiglu.py \
                  cross_entropy.py inputs.py properties.py compile.py)
test-newer-triton: $(NEWER_VENV)/.installed $(VENV)/.extension
	$(NEWER_VENV)/bin/python -m pytest -q $(TRITON_TESTS)

# The CMake build: kernels' C++ tests under ctest, the torch op library, the CUDA compile check (where nvcc is).
cmake-check: $(VENV)/.installed
	cmake -S . -B build/cmake -G Ninja -DCMAKE_PREFIX_PATH="$$($(VENV)/bin/python -c 'import torch; print(torch.utils.cmake_prefix_path)')" >/dev/null
	cmake --build build/cmake
	ctest --test-dir build/cmake --output-on-failure
	if command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ]; then cmake --build build/cmake --target cuda_check; fi
	if [ -f $(CUDA_INCLUDE)/cuda_runtime_api.h ]; then $(MAKE) --no-print-directory cuda-glue-check; fi

# The torch glue of the CUDA kernels (the LLAMA_KERNELS_WITH_CUDA parts of csrc/torch/cuda_ops.cpp and
# csrc/bindings.cpp) compiled, with csrc/build.json's flags, against the headers of a CUDA build of torch: this machine's torch is a CPU build,
# with which setup.py and CMake leave those parts out. Only the wheel's include/ is unpacked (63 MB of 550).
CUDA_TORCH ?= torch==2.14.1
CUDA_INCLUDE ?= /usr/local/cuda/include
CUDA_TORCH_INCLUDE := build/cuda-torch/torch/include
$(CUDA_TORCH_INCLUDE):
	$(VENV)/bin/python -m pip download --quiet --no-deps --dest build/cuda-torch "$(CUDA_TORCH)"
	cd build/cuda-torch && unzip -q -o torch-*.whl 'torch/include/*' && rm torch-*.whl

cuda-glue-check: $(CUDA_TORCH_INCLUDE)
	for f in csrc/torch/cuda_ops.cpp csrc/bindings.cpp; do \
	  g++ $$($(PYTHON) csrc/build_recipe.py) -fsyntax-only -Wall -Werror -Icsrc -I$(CUDA_TORCH_INCLUDE) \
	    -I$(CUDA_TORCH_INCLUDE)/torch/csrc/api/include -I$(CUDA_INCLUDE) $$f || exit 1; done

bench: $(VENV)/.extension
	$(VENV)/bin/llama-kernels bench

clean:
	rm -rf $(VENV) $(NEWER_VENV) build llama_kernels/_C*.so bench-out .pytest_cache .hypothesis .benchmarks
