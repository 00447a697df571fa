"""The benchmark end to end on CPU: `python -m llama_kernels.bench --quick` and the pytest-benchmark suites.

Both run in subprocesses without TRITON_INTERPRET (which this suite's conftest sets):
the benchmark measures what a user gets, not the interpreter.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama_kernels import cli
from llama_kernels.bench import add_arguments, harness, model, report

REPO = Path(__file__).resolve().parent.parent
MEMORY_BOUND = {"rms_norm", "rms_norm_residual", "rms_norm_bwd", "rms_norm_fwd_bwd", "rope", "rope_bwd",
                "rope_interleaved", "decode", "swiglu", "swiglu_bwd"}
ATTENTION = {"attention", "attention_causal", "attention_bwd", "attention_bwd_causal"}
MATMUL_BOUND = ATTENTION | {"cross_entropy"}


def run(*args, timeout=300):  # a guard against a hang, not a timing: a loaded machine doubles the runs
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_quick_benchmark_prints_the_table_and_writes_json_and_png(tmp_path):
    proc = run("-m", "llama_kernels.bench", "--quick", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "CPU FIGURES" in proc.stdout
    assert "median ms" in proc.stdout and "rms_norm_residual:" in proc.stdout  # the table
    assert "[1/" in proc.stderr  # progress
    assert (proc.stdout + proc.stderr).count("CPU FIGURES") == 1  # the notice, in the table
    # No progress line for a provider that cannot run here; one line lists them with the reason.
    progress = [line for line in proc.stderr.splitlines() if line.startswith("[")]
    assert not any(line.endswith((" liger", " sdpa_cudnn")) for line in progress)
    skipped = next(line for line in proc.stderr.splitlines() if line.startswith("skipped: "))
    assert "liger (Liger-Kernel needs CUDA), " in skipped and "ours_cuda (the extension's CUDA kernels" in skipped

    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["quick"] and result["device"]["kind"] == "cpu" and "CPU FIGURES" in result["device"]["notice"]
    assert result["ceilings"]["copy"]["gbps"] > 0 and result["ceilings"]["matmul"]["tflops"] > 0
    assert set(result["cases"]) == MEMORY_BOUND | MATMUL_BOUND
    rows = {(r["case"], r["provider"]): r for r in result["rows"]}
    for case in MEMORY_BOUND | MATMUL_BOUND:
        peer = "sdpa_flash" if case in ATTENTION | {"decode"} else "eager"
        unit, ceiling, work = ("TFLOP/s", "matmul", "flops") if case in MATMUL_BOUND else ("GB/s", "copy", "bytes")
        ours, other = rows[(case, "ours")], rows[(case, peer)]
        assert ours["status"] == other["status"] == "ok", (ours, other)
        assert ours["unit"] == unit and ours["ceiling"] == ceiling
        assert ours["rate"] > 0 and ours[work] > 0 and ours["floor_ms"] > 0 and ours["fraction_of_ceiling"] > 0
        assert other["ours_speedup"] == pytest.approx(other["median_ms"] / ours["median_ms"])
        cuda_only = ("sdpa_cudnn" if case in ATTENTION | {"decode"} else "ours_cuda" if case.startswith(("rms", "rope"))
                     else "liger")
        assert rows[(case, cuda_only)]["status"] == "skipped"
    assert not any(provider in ("compile", "flex") for _, provider in rows)  # --quick leaves compiling peers out
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The model section: the reduced Code Llama 7B at the CPU shapes, ours against the unpatched HF model.
    assert "model: Code Llama 7B, 2 of 32 layers, reduced" in (tmp_path / "bench.txt").read_text()
    assert result["model"]["reduced"] and result["model"]["config"]["n_layers"] == 2
    model_rows = {(r["label"], r["provider"]): r for r in result["model"]["rows"]}
    assert set(model_rows) == {(label, provider) for label, phase in (("prefill S=256", "prefill"),
                                                                      ("decode ctx=1024", "decode"))
                               for provider in model.PROVIDERS + model.VARIANTS[phase]}
    assert model_rows[("decode ctx=1024", "ours_graph")]["status"] == "skipped"  # CUDA graphs: CUDA only
    assert all(model_rows[key]["status"] == "ok" for key in (("prefill S=256", "ours_chunked"),
                                                             ("decode ctx=1024", "ours_paged")))
    for label, rate in (("prefill S=256", "tokens_per_s"), ("decode ctx=1024", "ms_per_token")):
        ours, hf = model_rows[(label, "ours")], model_rows[(label, "hf_sdpa")]
        assert ours["status"] == hf["status"] == "ok", (ours, hf)
        assert ours[rate] > 0 and ours["floor_ms"] > 0 and ours["peak_mem_bytes"] is None  # no CPU memory figures
        assert hf["ours_speedup"] == pytest.approx(hf["median_ms"] / ours["median_ms"])
    assert model_rows[("decode ctx=1024", "ours")]["cache_bytes"] > 0


def test_without_matplotlib_the_benchmark_says_it_skips_the_plot(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    result = {"cases": {"rms_norm": "RMSNorm forward"}, "rows": []}
    lines = report.write_outputs(result, tmp_path, "the table")
    assert lines == [f"wrote {tmp_path / 'bench.json'}", f"wrote {tmp_path / 'bench.txt'}",
                     "no plot: matplotlib is not installed (pip install matplotlib, or the [bench] extra)"]
    assert json.loads((tmp_path / "bench.json").read_text()) == result and not (tmp_path / "bench.png").exists()


def test_cpu_rows_time_their_providers_in_turns():
    calls = []

    def provider(name, fails_on_call=None):
        def call():
            calls.append(name)
            if len([c for c in calls if c == name]) == fails_on_call:
                raise RuntimeError(f"{name} failed")
        return call

    plan = harness.TimingPlan(gpu_warmup_ms=0, gpu_rep_ms=0, cpu_min_reps=4, cpu_max_reps=4, cpu_budget_s=0)
    fns = {"a": provider("a"), "b": provider("b"), "c": provider("c", fails_on_call=4)}
    results = harness.measure_in_turns(fns, plan)
    # Two warm calls each, then rounds in alternating order; c fails in the second round and drops out.
    assert calls == ["a", "a", "b", "b", "c", "c", "a", "b", "c", "c", "b", "a", "a", "b", "b", "a"]
    assert str(results["c"]) == "c failed"
    assert results["a"].reps == results["b"].reps == 4 and results["a"].min_ms <= results["a"].median_ms


def test_benchmark_suites_run_once_each():
    proc = run("-m", "pytest", "bench/", "--benchmark-disable", "-q", "-p", "no:cacheprovider")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert " passed" in proc.stdout


def test_cli_refuses_unknown_ops(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--ops", "rms_norm,softmax"])
    assert exit_info.value.code == 2
    assert "expected a comma-separated subset of rms_norm,rope" in capsys.readouterr().err


def test_cli_train_tokens_takes_positive_lengths(capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args(["--train-tokens", "16384, 32768"]).train_tokens == (16384, 32768)
    assert parser.parse_args([]).train_tokens is None  # the device's lengths
    with pytest.raises(SystemExit):
        parser.parse_args(["--train-tokens", "4096,0"])
    assert "expected a positive integer, got '0'" in capsys.readouterr().err


def test_gpu_check_without_a_gpu_says_so(tmp_path):
    proc = run("bench/gpu_check.py", str(tmp_path))
    assert proc.returncode == 2, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "no CUDA device" in (tmp_path / "summary.txt").read_text()


def test_gpu_check_benchmark_plan_covers_every_op():
    """The check's shape table must name every kind its ops use (a missing one fails only on the card)."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(REPO / "bench"))
    from llama_kernels.bench import cases

    items = cases.matrix(gpu_check.BENCH_OPS, torch.device("cpu"), False, with_compile=False,
                         shapes=cases.CHECK_SHAPES)
    sections = ("model", "train")  # no cases: the runner runs them
    op_cases = [op for op in gpu_check.BENCH_OPS if op not in sections]
    assert list(dict.fromkeys(item.case.op for item in items)) == op_cases  # in that order
    assert set(sections) <= set(gpu_check.BENCH_OPS) and isinstance(model.CHECK_SHAPES, model.ModelShapes)
    assert all(tokens > 0 for tokens in gpu_check.TRAIN_TOKENS)


def test_the_sweep_times_every_op_with_a_tuned_kernel():
    """The sweep's workloads are the benchmark's cases: every op whose kernels declare a Tuning has cases there."""
    from llama_kernels.bench import cases, sweep

    items = cases.matrix(sweep.SWEEP_OPS, torch.device("cpu"), False, with_compile=False, shapes=cases.SWEEP_SHAPES)
    assert {item.case.op for item in items} == set(sweep.SWEEP_OPS)


@pytest.fixture(scope="module")
def small_models():
    return model.build_models(model.model_config(reduced=True, layers=1), torch.device("cpu"))


def test_model_benchmark_runs_the_same_weights_in_ours_and_hf(small_models):
    """The state dict mapping: the prefill logits of ours and of the unpatched HF model agree."""
    logits = {}
    for provider in ("ours", "hf_sdpa"):
        with model.workload(model.ModelItem("prefill", 32, provider), small_models, torch.device("cpu")) as work:
            logits[provider] = work.fn().float()
    assert logits["ours"].shape == logits["hf_sdpa"].shape == (1, 1, small_models.config.vocab_size)
    torch.testing.assert_close(logits["ours"], logits["hf_sdpa"], atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("provider", ["ours", "ours_paged", "hf_sdpa"])
def test_model_decode_steps_all_see_the_same_context(small_models, provider):
    """Each timed step starts from ctx cached tokens: a cache that kept the previous step's token would change
    the next step's logits."""
    with model.workload(model.ModelItem("decode", 64, provider), small_models, torch.device("cpu")) as work:
        first, second = work.fn(), work.fn()
    assert torch.equal(first, second)
