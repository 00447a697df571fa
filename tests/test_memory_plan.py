"""The on-paper fine-tuning memory plan (llama_kernels.bench.memory_plan)."""

import pytest

from llama_kernels.bench import memory_plan as plan
from llama_kernels.models.config import CodeLlamaConfig


@pytest.mark.parametrize("name, billions", [("CodeLlama-7b", 6.74), ("CodeLlama-34b", 33.74)])
def test_parameter_count_is_the_published_one(name, billions):
    assert plan.parameter_count(CodeLlamaConfig.from_name(name)) / 1e9 == pytest.approx(billions, abs=0.01)


@pytest.mark.parametrize("way", plan.WAYS, ids=lambda way: way.name)
def test_longest_sequence_fits_and_the_next_does_not(way):
    c = CodeLlamaConfig.from_name("CodeLlama-7b")
    longest = plan.longest_sequence(c, way, 80, 16)
    budget = plan.usable_bytes(80)
    if longest == 0:
        assert plan.total_bytes(c, way, 1024, 16) > budget
    else:
        assert plan.total_bytes(c, way, longest, 16) <= budget < plan.total_bytes(c, way, longest + 1024, 16)


def test_fused_loss_and_swiglu_need_less_than_hf_defaults():
    c = CodeLlamaConfig.from_name("CodeLlama-7b")
    hf, ours = (next(w for w in plan.WAYS if w.lora and w.ours == mine) for mine in (False, True))
    for seq_len in plan.SEQUENCE_LENGTHS:
        assert plan.total_bytes(c, ours, seq_len, 16) < plan.total_bytes(c, hf, seq_len, 16)
    assert plan.longest_sequence(c, ours, 80, 16) > plan.longest_sequence(c, hf, 80, 16)


def test_table_names_every_model_and_way():
    text = plan.table()
    for name in plan.MODELS:
        assert text.count(f"| {name} |") == len(plan.WAYS)
