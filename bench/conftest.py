"""pytest-benchmark suites over the cases of ``llama_kernels.bench``.

    pytest bench/ --benchmark-only             # measure (GPU: the benchmark's shapes; CPU: small ones)
    pytest bench/ --benchmark-disable -q       # smoke test: each body runs once

Shapes, providers and byte or FLOP counts come from ``llama_kernels.bench.cases``;
each result's ``extra_info`` carries the rate (GB/s or TFLOP/s), its fraction of
the ceiling measured in this session (copy bandwidth or matmul peak) and the floor. On a GPU the timer synchronizes
before reading the clock, so queued kernels are counted.
"""

import pytest
import torch

from llama_kernels.bench import cases, harness

DEVICE = harness.default_device()


def pytest_collection_modifyitems(items):
    timer = harness.sync_timer(DEVICE)
    for item in items:
        bench_item = item.callspec.params.get("item") if hasattr(item, "callspec") else None
        if bench_item is not None:
            group = f"{bench_item.case.name} {bench_item.shape.label(bench_item.case.op)}"
            item.add_marker(pytest.mark.benchmark(group=group, timer=timer))


@pytest.fixture(scope="session")
def ceilings() -> dict:
    return harness.measure_ceilings(DEVICE, quick=DEVICE.type == "cpu")


@pytest.fixture
def run_item(benchmark, ceilings):
    """Time one (case, shape, provider) and record its derived figures in extra_info."""

    def run(item: cases.Item):
        torch.manual_seed(0)
        inputs = item.case.make_inputs(item.shape, DEVICE)
        try:
            fn = item.case.build(item.provider, inputs, DEVICE)
        except cases.Unavailable as e:
            pytest.skip(str(e))
        fn()  # compiles and first allocations happen here, outside the timed rounds
        benchmark(fn)
        benchmark.extra_info.update(device=DEVICE.type, shape=item.shape.as_dict(item.case.op),
                                    provider=item.provider)
        if benchmark.stats is not None:  # None under --benchmark-disable: nothing was timed
            median_ms = benchmark.stats.stats.median * 1e3
            benchmark.extra_info.update(cases.figures(item.case, item.shape, median_ms, ceilings))

    return run
