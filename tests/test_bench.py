"""The benchmark end to end on CPU: `python -m llama_kernels.bench --quick` and the pytest-benchmark suites.

Both run in subprocesses without TRITON_INTERPRET (which this suite's conftest sets):
the benchmark measures what a user gets, not the interpreter.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llama_kernels import cli

REPO = Path(__file__).resolve().parent.parent
CASES = {"rms_norm", "rms_norm_residual", "rms_norm_bwd", "rms_norm_fwd_bwd", "rope", "rope_bwd"}


def run(*args, timeout=120):
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_quick_benchmark_prints_the_table_and_writes_json_and_png(tmp_path):
    proc = run("-m", "llama_kernels.bench", "--quick", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "CPU FIGURES" in proc.stdout
    assert "median ms" in proc.stdout and "rms_norm_residual:" in proc.stdout  # the table
    assert "[1/" in proc.stderr  # progress

    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["quick"] and result["device"]["kind"] == "cpu" and "CPU FIGURES" in result["device"]["notice"]
    assert result["ceilings"]["copy"]["gbps"] > 0 and result["ceilings"]["matmul"]["tflops"] > 0
    assert set(result["cases"]) == CASES
    rows = {(r["case"], r["provider"]): r for r in result["rows"]}
    for case in CASES:
        ours, eager = rows[(case, "ours")], rows[(case, "eager")]
        assert ours["status"] == eager["status"] == "ok", (ours, eager)
        assert ours["gbps"] > 0 and ours["bytes"] > 0 and ours["floor_ms"] > 0
        assert eager["ours_speedup"] == pytest.approx(eager["median_ms"] / ours["median_ms"])
        assert rows[(case, "liger")]["status"] == "skipped"  # CUDA only
    assert not any(provider == "compile" for _, provider in rows)  # --quick leaves torch.compile out
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_benchmark_suites_run_once_each():
    proc = run("-m", "pytest", "bench/", "--benchmark-disable", "-q", "-p", "no:cacheprovider")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert " passed" in proc.stdout


def test_cli_refuses_unknown_ops(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--ops", "rms_norm,softmax"])
    assert exit_info.value.code == 2
    assert "expected a comma-separated subset of rms_norm,rope" in capsys.readouterr().err
