"""pytest-benchmark suites over the cases of ``llama_kernels.bench``.

    pytest bench/ --benchmark-only             # measure (GPU: the benchmark's shapes; CPU: small ones)
    pytest bench/ --benchmark-disable -q       # smoke test: each body runs once

Shapes, providers and byte counts come from ``llama_kernels.bench.cases``; each
result's ``extra_info`` carries bytes, GB/s, the fraction of the copy bandwidth
measured in this session and the floor time. On a GPU the timer synchronizes
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
def copy_ceiling() -> dict:
    return harness.measure_copy(DEVICE, quick=DEVICE.type == "cpu")


@pytest.fixture
def run_item(benchmark, copy_ceiling):
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
        nbytes = item.case.bytes_moved(item.shape)
        copy_gbps = copy_ceiling["gbps"]
        benchmark.extra_info.update(
            device=DEVICE.type, shape=item.shape.as_dict(item.case.op), provider=item.provider, bytes=nbytes,
            copy_gbps=copy_gbps, floor_s=nbytes / (copy_gbps * 1e9),
        )
        if benchmark.stats is not None:  # None under --benchmark-disable: nothing was timed
            gbps = nbytes / benchmark.stats.stats.median / 1e9
            benchmark.extra_info.update(gbps=gbps, fraction_of_copy=gbps / copy_gbps)

    return run
