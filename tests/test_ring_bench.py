"""The ring attention overlap benchmark end to end on CPU: 2 gloo processes, tiny shapes, fp32.

Runs in a subprocess without TRITON_INTERPRET (which this suite's conftest sets), on the
reference backend: the interpreter would be too slow for a benchmark.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_ring_bench_reports_both_timings_and_the_overlap(tmp_path):
    out = tmp_path / "ring.json"
    env = {name: value for name, value in os.environ.items() if name not in ("TRITON_INTERPRET", "RANK", "WORLD_SIZE")}
    proc = subprocess.run(
        [sys.executable, "-m", "llama_kernels.distributed.bench", "--world", "2", "--seqlen", "256", "--heads", "4/2",
         "--head-dim", "64", "--reps", "2", "--dtype", "float32", "--backend", "reference", "--causal", "--backward",
         "--json", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "t_ring ms" in proc.stdout and "CPU FIGURES" in proc.stdout  # the table, on rank 0 only
    assert proc.stdout.count("t_ring ms") == 1

    result = json.loads(out.read_text())
    assert result["config"]["world"] == 2 and result["config"]["backend"] == "reference"
    assert result["bytes_per_step"]["kv"] == 2 * 128 * 2 * 64 * 4  # k and v: (1, 256 / 2, 2, 64) fp32 each
    assert set(result["passes"]) == {"fwd", "fwd_bwd"}
    for name, p in result["passes"].items():
        assert len(p["ranks"]) == 2
        for row in p["ranks"] + [p["max"]]:
            assert row["t_ring_s"] > 0 and row["t_compute_s"] > 0, (name, row)
            assert 0 < row["efficiency"] <= 2, (name, row)
            assert row["gbps_sustained"] > 0 and row["gbps_to_hide"] > 0
        assert p["max"]["t_ring_s"] == max(r["t_ring_s"] for r in p["ranks"])
