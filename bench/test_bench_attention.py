"""Attention forward and backward, causal and not: ours against SDPA's backends, FlexAttention and flash-attn."""

import pytest

from llama_kernels.bench.cases import suite_items


@pytest.mark.parametrize("item", suite_items("attention"), ids=str)
def test_attention(run_item, item):
    run_item(item)
