"""Linear cross-entropy forward + backward: ours against the materialized logits, torch.compile, Liger, CCE."""

import pytest

from llama_kernels.bench.cases import suite_items


@pytest.mark.parametrize("item", suite_items("cross_entropy"), ids=str)
def test_cross_entropy(run_item, item):
    run_item(item)
