"""One decoding step over a KV cache: ours (split-KV) against our prefill kernel, SDPA's backends, FlexAttention."""

import pytest

from llama_kernels.bench.cases import suite_items


@pytest.mark.parametrize("item", suite_items("decode"), ids=str)
def test_decode(run_item, item):
    run_item(item)
