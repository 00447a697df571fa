"""SwiGLU forward and backward: ours against torch eager, torch.compile and Liger."""

import pytest

from llama_kernels.bench.cases import suite_items


@pytest.mark.parametrize("item", suite_items("swiglu"), ids=str)
def test_swiglu(run_item, item):
    run_item(item)
