"""The training benchmark's pieces: the CPU peak-memory measure, and the train section end to end (tiny)."""

import contextlib
import functools
import os

import pytest
import torch

from llama_kernels.bench import harness, train

pytest.importorskip("transformers")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="not Linux: no peak-RSS reset")
def test_cpu_peak_memory_is_what_the_call_allocates():
    """A call that makes a 48 MiB tensor (and frees it: the peak, not what stays) measures 48 MiB, to a few pages;
    one that allocates nothing measures about nothing."""
    size = 48 * 2**20
    allocating = functools.partial(torch.full, (size,), 7, dtype=torch.uint8)  # written: its pages are resident
    peak = harness.cpu_peak_memory_bytes(functools.partial(contextlib.nullcontext, allocating))
    assert size <= peak <= size + 2**20, peak
    nothing = functools.partial(torch.empty, 0)
    assert harness.cpu_peak_memory_bytes(functools.partial(contextlib.nullcontext, nothing)) < 2**20


def test_train_section_measures_every_provider_at_its_lengths(monkeypatch):
    # Not hf_patched: under the tests' TRITON_INTERPRET=1 its ops would run the interpreter (minutes); ours names
    # its backend, and test_hf_patch holds the patched loss to stock transformers'.
    providers = tuple(p for p in train.PROVIDERS if p != "hf_patched")
    monkeypatch.setattr(train, "PROVIDERS", providers)
    # The fresh process per row (a spawned interpreter importing torch and transformers, the models built again)
    # is the peak-memory test's above; here each row's setup is built and stepped in this process instead.
    def peak_here(step, device, setup):
        with setup() as fresh:
            fresh()
        return 1
    monkeypatch.setattr(train, "peak_memory_bytes", peak_here)
    result = train.run_train_benchmark(torch.device("cpu"), quick=True, layers=1)
    rows = {(r["tokens"], r["provider"]): r for r in result["rows"]}
    assert set(rows) == {(tokens, provider) for tokens in train.QUICK_TOKENS for provider in providers}
    assert result["reduced"] and result["config"]["n_layers"] == 1
    assert rows[train.QUICK_TOKENS[0], "hf_liger"]["status"] == "skipped"  # Liger needs CUDA
    for provider in ("ours", "hf_sdpa"):
        row = rows[train.QUICK_TOKENS[0], provider]
        assert row["status"] == "ok", row
        assert row["median_ms"] > 0 and row["peak_mem_bytes"] > 0
    table = "\n".join(train.format_section(result))
    assert "train: Code Llama 7B, 1 of 32 layers, reduced to dim 1024" in table
