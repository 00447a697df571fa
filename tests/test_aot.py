"""Every Triton kernel compiles for sm_80 and sm_90 at Code Llama shapes: no error, no spill, shared memory
within the card, and on sm_90 the attention kernels' matrix products are wgmma."""

import os
import subprocess
import sys


def test_ahead_of_time_compile_is_clean(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_CACHE_DIR")}
    env["TMPDIR"] = str(tmp_path)  # where its scratch folders go: none may be left behind
    run = subprocess.run([sys.executable, "-m", "llama_kernels.aot"], env=env, capture_output=True, text=True,
                         timeout=600)
    print(run.stdout)  # the register / shared-memory table, shown with pytest -s or on failure
    assert run.returncode == 0, run.stdout + run.stderr
    for target in ("sm80", "sm90"):
        for kernel in ("rms_norm_fwd", "rms_norm_bwd", "rope", "attention_fwd", "attention_bwd_delta",
                       "attention_bwd_dkdv", "attention_bwd_dq", "swiglu_fwd", "swiglu_bwd", "cross_entropy_step"):
            assert any(line.startswith(target) and kernel in line for line in run.stdout.splitlines()), (target, kernel)
    assert " 0 failed" in run.stdout
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith("torchinductor_")] == []  # torch's own cache
