"""RMSNorm forward, forward with residual, forward + backward: ours against its peers."""

import pytest

from llama_kernels.bench.cases import suite_items


@pytest.mark.parametrize("item", suite_items("rms_norm"), ids=str)
def test_rms_norm(run_item, item):
    run_item(item)
