"""The attention choice (ops/attention_choice.py): SDPA where the card's table says it beats ours, ours elsewhere.

Each choice forced on the CPU: "sdpa" gives what "llama_kernels" gives, for CodeLlama and for the patched Hugging
Face model, in prefill, decoding and a training step; "auto" runs ours on the CPU, and SDPA on a (faked) sm90 whose
table entry says so, saying so once per phase.
"""

import collections
import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llama_kernels.bench import model as model_bench
from llama_kernels.bench import train as train_bench
from llama_kernels.models import CodeLlama, code_llama
from llama_kernels.ops import _triton, attention_choice
from test_models import TINY, tiny_model

TOL = dict(rtol=1e-5, atol=1e-5)  # fp32: the two compute the same softmax(q k^T) v


@pytest.fixture
def runs(monkeypatch):
    """How often each attention ran: "ours" (the model's flash kernels) and "sdpa" (torch's function)."""
    counts = collections.Counter()

    def spy(name, function):
        def counting(*args, **kwargs):
            counts[name] += 1
            return function(*args, **kwargs)
        return counting

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy("sdpa", F.scaled_dot_product_attention))
    for name in ("flash_attention", "flash_attention_with_kvcache"):
        monkeypatch.setattr(code_llama, name, spy("ours", getattr(code_llama, name)))
    return counts


@pytest.fixture
def sm90(monkeypatch):
    """Every tensor's target is sm90, the table the committed one, and no (card, phase) told yet."""
    monkeypatch.setattr(attention_choice, "target_of", lambda device: "sm90")
    monkeypatch.setattr(attention_choice, "_warned", set())


def cached_steps(model, tokens):
    """Prefill 5 tokens of each sequence, then steps of 1, 1 and 3: the logits of every position."""
    cache = model.new_cache(tokens.shape[0], tokens.shape[1] + 1)
    pieces = [model(tokens[:, :5], cache=cache)]
    for start, stop in ((5, 6), (6, 7), (7, tokens.shape[1])):
        pieces.append(model(tokens[:, start:stop], cache=cache))
    return torch.cat(pieces, dim=1)


# --------------------------------------------------------------------------- CodeLlama
def test_code_llama_sdpa_gives_what_ours_gives(runs):
    model = tiny_model(rope_interleaved=True)
    tokens = torch.randint(0, TINY.vocab_size, (2, 10))
    targets = torch.randint(0, TINY.vocab_size, (2, 10))
    prompts = [[1, 5, 9, 200, 17], [3, 4]]  # different lengths: each sequence decodes from its own position
    results = {}
    for choice in ("llama_kernels", "sdpa"):
        model.attention = choice
        model.zero_grad()
        model(tokens, targets=targets).backward()
        with torch.no_grad():
            results[choice] = (model(tokens), cached_steps(model, tokens),
                               [p.grad.clone() for p in model.parameters()], model.generate(prompts, 6))
        ran, other = ("sdpa", "ours") if choice == "sdpa" else ("ours", "sdpa")
        assert runs[ran] > 0 and runs[other] == 0, choice
        runs.clear()
    (logits, steps, grads, generated), (*sdpa, sdpa_generated) = results["llama_kernels"], results["sdpa"]
    for want, got in zip((logits, steps, *grads), (sdpa[0], sdpa[1], *sdpa[2]), strict=True):
        torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(steps, logits, rtol=1e-4, atol=1e-4)  # the cache's steps are the full forward's
    assert sdpa_generated == generated


def test_code_llama_sdpa_decode_of_shorter_prompts_reads_no_stale_memory(monkeypatch):
    """SDPA's decode reads each sequence's keys up to the longest prompt's, masked: with every floating
    torch.empty NaN-filled (memory a fresh process may hold), generate's cache must still give ours' tokens."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty", nan_empty)
    model = tiny_model()
    generated = {}
    for choice in ("llama_kernels", "sdpa"):
        model.attention = choice
        generated[choice] = model.generate([[1, 5, 9, 200, 17], [3, 4]], 3)
    assert generated["sdpa"] == generated["llama_kernels"]


def test_code_llama_auto_runs_ours_on_the_cpu(runs):
    model = tiny_model()
    assert model.attention == "auto"
    with warnings.catch_warnings(record=True) as told:
        warnings.simplefilter("always")
        cached_steps(model, torch.randint(0, TINY.vocab_size, (1, 8)))
    assert not [w for w in told if "attention='auto'" in str(w.message)]
    assert runs["ours"] == 4 * TINY.n_layers and runs["sdpa"] == 0


def test_code_llama_auto_on_sm90_runs_sdpa_and_says_so_once_per_phase(runs, sm90):
    model = tiny_model()
    tokens = torch.randint(0, TINY.vocab_size, (1, 8))
    with pytest.warns(UserWarning) as told:
        model(tokens, targets=tokens).backward()  # training: the backward's entry
        cached_steps(model, tokens)  # a prefill (the forward's) and decoding steps, twice
        cached_steps(model, tokens)
    messages = [str(w.message) for w in told if "attention='auto'" in str(w.message)]
    assert len(messages) == 3, messages
    for phase, message in zip(("backward", "forward", "decode"), messages, strict=True):
        assert f"for the {phase} on sm90" in message and "H100" in message and "'llama_kernels'" in message
    assert runs["ours"] == 0 and runs["sdpa"] == TINY.n_layers * 9


def test_auto_follows_each_phase_of_the_table_and_forcing_overrides_it(monkeypatch, sm90):
    monkeypatch.setattr(attention_choice, "attention_table", lambda: {"sm90": {"decode": "sdpa", "measured": "x"}})
    cuda = torch.device("cuda")  # never touched: the target is faked
    with pytest.warns(UserWarning, match="for the decode on sm90"):
        assert attention_choice.attention_for("auto", cuda, "decode") == "sdpa"
    assert attention_choice.attention_for("auto", cuda, "forward") == "llama_kernels"
    assert attention_choice.attention_for("llama_kernels", cuda, "decode") == "llama_kernels"
    assert attention_choice.attention_for("sdpa", cuda, "forward") == "sdpa"
    monkeypatch.setattr(attention_choice, "target_of", lambda device: "sm80")  # never measured: ours
    assert attention_choice.attention_for("auto", cuda, "decode") == "llama_kernels"


@pytest.mark.parametrize("make, error", [
    (lambda: CodeLlama(TINY, attention="flash"), ValueError),
    (lambda: setattr(tiny_model(), "attention", True), TypeError),
])
def test_code_llama_refuses_an_unknown_attention(make, error):
    with pytest.raises(error, match=r"^attention: expected one of \('auto', 'llama_kernels', 'sdpa'\), got "):
        make()


# --------------------------------------------------------------------------- the table and its proposal
def test_the_committed_table_names_a_choice_per_phase_and_what_it_rests_on():
    for target, entry in attention_choice.attention_table().items():
        assert target.startswith("sm") and entry.get("measured"), target
        assert set(entry) - {"measured"} <= set(attention_choice.PHASES), target
        assert {entry[phase] for phase in set(entry) - {"measured"}} <= {"llama_kernels", "sdpa"}, target


def test_the_proposed_entry_is_sdpa_where_its_best_backend_beats_ours_at_a_shape():
    def row(case, shape, provider, ms, status="ok"):
        return dict(case=case, shape_label=shape, provider=provider, median_ms=ms, status=status)

    rows = [row("attention_causal", "a", "ours", 1.0), row("attention_causal", "a", "sdpa_flash", 1.3),
            row("attention_causal", "a", "sdpa_cudnn", 0.8),  # the best SDPA backend wins at shape a
            row("attention_causal", "b", "ours", 1.0), row("attention_causal", "b", "sdpa_cudnn", 1.1),
            row("attention_bwd_causal", "a", "ours", 1.0), row("attention_bwd_causal", "a", "sdpa_flash", 2.0),
            row("attention_bwd_causal", "a", "flash_attn", 0.5),  # not SDPA: not what the user had
            row("decode", "a", "ours", 1.0), row("decode", "a", "sdpa_flash", 0.1, status="error")]
    assert attention_choice.proposed_entry(rows, "card, date") == {
        "forward": "sdpa", "backward": "llama_kernels", "measured": "card, date"}
    assert attention_choice.proposed_entry([], "card") == {}


def test_the_benchmarks_say_which_attention_ran():
    models, cpu = model_bench.Models(TINY, tiny_model(), hf=None), torch.device("cpu")
    assert [model_bench.attention_ran(provider, models, cpu, "forward") for provider in train_bench.PROVIDERS] == [
        "llama_kernels", "sdpa", "llama_kernels", "sdpa"]  # ours, hf_sdpa, hf_patched (auto: ours on a CPU), Liger
    models.ours.attention = "sdpa"
    assert model_bench.attention_ran("ours", models, cpu, "decode") == "sdpa"
    timed = dict(status="ok", median_ms=1.0, tokens_per_s=1.0, floor_ms=1.0, peak_mem_bytes=None, attention="sdpa")
    model_row = dict(timed, phase="prefill", label="prefill S=8", provider="ours")
    train_row = dict(timed, tokens=8, label="S=8", provider="ours")
    assert model_bench.format_section({"title": "t", "rows": [model_row]})[-1].split()[-1] == "sdpa"
    assert train_bench.format_section({"title": "t", "rows": [train_row]})[-1].split()[-1] == "sdpa"


def test_gpu_check_proposes_the_table_with_the_cards_entry(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "bench"))
    import gpu_check
    monkeypatch.setattr(_triton, "target_of", lambda device: "sm100")
    rec = gpu_check.Recorder()
    rec.results["device"] = {"name": "B200", "date": "2027-01-01", "torch": "t", "triton": "t"}
    rows = [dict(case="decode", shape_label="a", provider=provider, median_ms=ms, status="ok")
            for provider, ms in (("ours", 1.0), ("sdpa_flash", 2.0))]
    gpu_check.propose_attention_choice(rec, tmp_path, rows)
    table = json.loads((tmp_path / "attention_choice.json").read_text())
    assert table == {**attention_choice.attention_table(),
                     "sm100": {"decode": "llama_kernels", "measured": "B200, 2027-01-01, gpu_check"}}
    assert "attention choice proposed for sm100" in gpu_check.summary(rec, rec.results["device"])
