"""Benchmarks of the ops against the peers a Code Llama user would otherwise run.

    llama-kernels bench [--quick] [--out DIR] [--ops rms_norm,rope,model] [--no-plot] [--model-layers 8]
    python -m llama_kernels.bench ...            # the same

- ``cases``: the ops, their Code Llama shapes, peers and byte counts (shared with
  the pytest-benchmark suites in ``bench/`` and ``bench/gpu_check.py``);
- ``model``: the model section, a Code Llama 7B layer stack against Hugging Face's
  model (SDPA, and patched), prefill throughput and decode latency;
- ``harness``: timing, the copy and matmul ceilings, device facts;
- ``runner``: the run and its command line; ``report``: table, JSON, plot.
"""

from .runner import add_arguments, main, run_benchmark, run_from_args

__all__ = ["add_arguments", "main", "run_benchmark", "run_from_args"]
