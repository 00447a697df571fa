"""The Code Llama 7B layer stack, prefill and decode: ours against the Hugging Face model (SDPA, and patched).

The items, models and timed calls are ``llama_kernels.bench.model``'s: on a GPU its shapes and
layer count; on a CPU the reduced model at its small shapes (a smoke test).
"""

import pytest

from llama_kernels.bench import cases, harness, model

DEVICE = harness.default_device()
REDUCED = DEVICE.type != "cuda"
TIMER = harness.sync_timer(DEVICE)  # conftest marks the op cases' "item"s only: these carry their own mark


@pytest.fixture(scope="module")
def models():
    return model.build_models(model.model_config(REDUCED), DEVICE)


@pytest.mark.parametrize("model_item", [
    pytest.param(item, id=str(item), marks=pytest.mark.benchmark(group=f"model {item.label}", timer=TIMER))
    for item in model.items(model.REDUCED_SHAPES if REDUCED else model.GPU_SHAPES)
])
def test_model(benchmark, models, ceilings, model_item):
    if benchmark.disabled and REDUCED and model_item.provider in model.COMPILED_PROVIDERS:
        pytest.skip("a smoke run on a CPU leaves out the compiling peers (a minute's compile); timed runs take them")
    try:
        with model.workload(model_item, models, DEVICE) as work:
            work.fn()  # first allocations and compiles happen here, outside the timed rounds
            benchmark(work.fn)
    except cases.Unavailable as e:
        pytest.skip(str(e))
    benchmark.extra_info.update(device=DEVICE.type, phase=model_item.phase, tokens=model_item.tokens,
                                provider=model_item.provider,
                                config=models.config.to_dict())
    if benchmark.stats is not None:  # None under --benchmark-disable: nothing was timed
        median_ms = benchmark.stats.stats.median * 1e3
        benchmark.extra_info.update(model.figures(model_item, models.config, median_ms, ceilings))
