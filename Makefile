# Two entry points, each installing what it needs into a project virtualenv first:
#   make bench   the main job: llama-kernels bench on whatever device is present
#   make test    the test suite: Triton kernels under the interpreter on CPU, the
#                ahead-of-time compile for sm_80/sm_90, the benchmark's smoke run
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

.PHONY: install test test-newer-triton bench clean

install: $(VENV)/.installed

# $(1): the virtualenv, $(2): the triton requirement
define make_venv
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install --quiet --upgrade pip
	$(1)/bin/python -m pip install --quiet "$(TORCH)" "$(2)"
	$(1)/bin/python -m pip install --quiet -e ".[test,bench]"
	touch $(1)/.installed
endef

$(VENV)/.installed: setup.py pyproject.toml Makefile
	$(call make_venv,$(VENV),$(TRITON))

$(NEWER_VENV)/.installed: setup.py pyproject.toml Makefile
	$(call make_venv,$(NEWER_VENV),$(NEWER_TRITON))

test: $(VENV)/.installed test-newer-triton
	$(VENV)/bin/python -m pytest tests

test-newer-triton: $(NEWER_VENV)/.installed
	$(NEWER_VENV)/bin/python -m pytest tests -q --ignore=tests/test_aot.py --ignore=tests/test_bench.py

bench: $(VENV)/.installed
	$(VENV)/bin/llama-kernels bench

clean:
	rm -rf $(VENV) $(NEWER_VENV) bench-out .pytest_cache .hypothesis .benchmarks
