"""RoPE forward and backward on q and k: ours against its peers."""

import pytest

from llama_kernels.bench.cases import suite_items


@pytest.mark.parametrize("item", suite_items("rope"), ids=str)
def test_rope(run_item, item):
    run_item(item)
