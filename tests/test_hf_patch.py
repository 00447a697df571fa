"""patch_hf_llama: transformers' Llama on the kernels gives what stock transformers gives.

A tiny Code Llama-shaped model (GQA, rope_theta 1e6, head_dim 64 as the kernels need), fp32, random
weights; the stock model's outputs are taken before patching (the patch is class-wide), and every
test unpatches after itself.
"""

import collections
import inspect

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: E402
from transformers.models.llama import modeling_llama  # noqa: E402

try:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    REGISTRIES = [ALL_ATTENTION_FUNCTIONS, ALL_MASK_ATTENTION_FUNCTIONS]
except ImportError:  # before 4.53 the models build their masks themselves
    REGISTRIES = [ALL_ATTENTION_FUNCTIONS]

from llama_kernels.models import hf  # noqa: E402

TINY = dict(hidden_size=256, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
            vocab_size=300, rope_theta=1e6, rms_norm_eps=1e-5, max_position_embeddings=64, pad_token_id=0)
LAYERS = TINY["num_hidden_layers"]
# fp32, measured: logits (|logits| < 2) within 6e-7 of stock, gradients within 1e-7.
TOL = dict(atol=1e-4, rtol=1e-4)
# What each of patch_hf_llama's switches replaces (attention: registry entries, below).
REPLACED = {"rms_norm": [(modeling_llama.LlamaRMSNorm, "forward"), (modeling_llama.LlamaDecoderLayer, "forward")],
            "rope": [(modeling_llama.LlamaRotaryEmbedding, "forward"), (modeling_llama, "apply_rotary_pos_emb")],
            "attention": [],
            "swiglu": [(modeling_llama.LlamaMLP, "forward")],
            "cross_entropy": [(modeling_llama.LlamaForCausalLM, "forward")]}
PATCHED = [place for places in REPLACED.values() for place in places]


@pytest.fixture(autouse=True)
def _unpatch():
    yield
    hf.unpatch_hf_llama()


@pytest.fixture
def calls(monkeypatch):
    """How often each kernel ran, as hf.py looks them up; "fused": rms_norm given a residual,
    "decode": flash_attention with fewer queries than keys (a KV cache's step)."""
    counts = collections.Counter()

    def counting(name, kernel):
        def spy(*args, **kwargs):
            counts[name] += 1
            counts["fused"] += name == "rms_norm" and kwargs.get("residual") is not None
            counts["decode"] += name == "flash_attention" and args[0].shape[1] < args[1].shape[1]
            return kernel(*args, **kwargs)
        return spy

    for name in ("rms_norm", "apply_rope", "flash_attention", "swiglu", "fused_linear_cross_entropy"):
        monkeypatch.setattr(hf, name, counting(name, getattr(hf, name)))
    return counts


def twin_models(**overrides):
    """A stock model and one with the same random weights, in eval mode."""
    config = {**TINY, **overrides}
    stock = LlamaForCausalLM(LlamaConfig(**config)).eval()
    model = LlamaForCausalLM(LlamaConfig(**config)).eval()
    model.load_state_dict(stock.state_dict())
    return stock, model


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def assert_ran_kernels(calls, forwards):
    """Each forward: per layer a norm, a fused add + norm, a RoPE and an attention; then the final norm."""
    assert calls["rms_norm"] == forwards * (2 * LAYERS + 1)
    assert calls["fused"] == forwards * LAYERS
    assert calls["apply_rope"] == calls["flash_attention"] == forwards * LAYERS


@pytest.mark.parametrize("seqlen", [7, 19])
def test_logits_match(calls, seqlen):
    stock, model = twin_models()
    ids = torch.randint(1, TINY["vocab_size"], (2, seqlen))
    expected = logits(stock, ids)
    hf.patch_hf_llama(model)
    torch.testing.assert_close(logits(model, ids), expected, **TOL)
    assert_ran_kernels(calls, forwards=1)


@pytest.mark.parametrize("rope_scaling", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8},
    {"rope_type": "dynamic", "factor": 2.0},  # inv_freq recomputed: 19 tokens pass max_position_embeddings
], ids=lambda scaling: scaling["rope_type"])
def test_scaled_rope_matches(calls, rope_scaling):
    stock, model = twin_models(rope_scaling=rope_scaling, max_position_embeddings=16)
    ids = torch.randint(1, TINY["vocab_size"], (2, 19))
    expected = logits(stock, ids)
    hf.patch_hf_llama(model)
    torch.testing.assert_close(logits(model, ids), expected, **TOL)
    assert calls["apply_rope"] == LAYERS


def test_greedy_generation_matches(calls):
    stock, model = twin_models()
    ids = torch.randint(1, TINY["vocab_size"], (2, 7))
    generate = dict(attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    expected = stock.generate(ids, **generate)
    hf.patch_hf_llama(model)
    assert torch.equal(model.generate(ids, **generate), expected)
    assert calls["decode"] == 7 * LAYERS  # the steps after the prompt's: one query, all the keys so far


def test_left_padding_is_not_ignored(calls):
    """A left-padded batch falls back to sdpa with the padding mask: the padded prompt continues as it does alone."""
    stock, model = twin_models()
    ids = torch.randint(1, TINY["vocab_size"], (2, 7))
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = TINY["pad_token_id"], 0
    generate = dict(max_new_tokens=8, do_sample=False)
    expected = stock.generate(ids, attention_mask=mask, **generate)
    hf.patch_hf_llama(model)
    got = model.generate(ids, attention_mask=mask, **generate)
    assert torch.equal(got, expected)
    alone = model.generate(ids[1:, 3:], attention_mask=mask[1:, 3:], **generate)
    assert torch.equal(got[1:, 3:], alone)


def test_training_gradients_match(calls):
    stock, model = twin_models()
    ids = torch.randint(1, TINY["vocab_size"], (2, 19))
    labels = torch.randint(0, TINY["vocab_size"], (2, 19))

    def loss(m):
        return F.cross_entropy(m(ids).logits.flatten(0, 1), labels.flatten())

    loss(stock.train()).backward()
    hf.patch_hf_llama(model.train())
    loss(model).backward()
    assert_ran_kernels(calls, forwards=1)
    for (name, want), got in zip(stock.named_parameters(), model.parameters(), strict=True):
        assert got.grad is not None, name
        torch.testing.assert_close(got.grad, want.grad, **TOL, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("num_items, checkpointing", [(False, False), (True, True)],
                         ids=["mean", "num_items_in_batch-gradient-checkpointing"])
def test_training_loss_with_labels_matches(calls, num_items, checkpointing):
    """model(ids, labels=...) in training: HF's shifted loss through the fused op (the logits never built, None),
    -100 labels left out, divided by num_items_in_batch where given (gradient accumulation's)."""
    stock, model = twin_models()
    ids = torch.randint(1, TINY["vocab_size"], (2, 19))
    labels = ids.clone()
    labels[0, :6] = labels[1, -3:] = -100  # a prompt, a padded tail
    extra = {"num_items_in_batch": torch.tensor(2 * 19 + 5)} if num_items else {}  # the whole accumulated batch's
    outputs = []
    for m in (stock, model):
        if m is model:
            hf.patch_hf_llama(model)
        if checkpointing:
            getattr(m, "activation_checkpointing_enable", m.gradient_checkpointing_enable)()  # renamed in 5.x
        out = m.train()(ids, labels=labels, **extra)
        out.loss.backward()
        outputs.append(out)
    (want, got) = outputs
    assert got.logits is None and calls["fused_linear_cross_entropy"] == 1
    assert calls["swiglu"] == LAYERS * (2 if checkpointing else 1)  # checkpointing: each layer again in the backward
    torch.testing.assert_close(got.loss, want.loss, atol=1e-5, rtol=1e-5)
    for (name, want_p), got_p in zip(stock.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(got_p.grad, want_p.grad, **TOL, msg=lambda m, name=name: f"{name}: {m}")


def test_eval_mode_and_calls_without_labels_run_the_original_head(calls):
    stock, model = twin_models()
    ids = torch.randint(1, TINY["vocab_size"], (1, 7))
    with torch.no_grad():
        want = stock(ids, labels=ids)
        hf.patch_hf_llama(model)
        got = model(ids, labels=ids)  # eval mode
        no_labels = model.train()(ids)
    torch.testing.assert_close(got.logits, want.logits, **TOL)
    torch.testing.assert_close(got.loss, want.loss, **TOL)
    assert no_labels.loss is None and no_labels.logits.shape == (1, 7, TINY["vocab_size"])
    assert calls["fused_linear_cross_entropy"] == 0


@pytest.mark.parametrize("piece", list(REPLACED))
def test_a_switch_off_leaves_its_piece_unpatched(piece):
    originals = {place: vars(place[0])[place[1]] for place in PATCHED}
    model = LlamaForCausalLM(LlamaConfig(**TINY))
    implementation = model.config._attn_implementation
    hf.patch_hf_llama(model, **{piece: False})
    for other, places in REPLACED.items():
        for owner, name in places:
            assert (vars(owner)[name] is originals[owner, name]) == (other == piece), (other, name)
    assert all(("llama_kernels" in registry) == (piece != "attention") for registry in REGISTRIES)
    assert (model.config._attn_implementation == implementation) == (piece == "attention")
    hf.patch_hf_llama(model)  # a second call patches what is left
    assert all(vars(owner)[name] is not originals[owner, name] for owner, name in PATCHED)
    hf.unpatch_hf_llama()
    assert all(vars(owner)[name] is originals[owner, name] for owner, name in PATCHED)


def test_a_switch_that_is_not_a_bool_is_refused():
    with pytest.raises(TypeError, match=r"^swiglu: expected True or False, got 'no'"):
        hf.patch_hf_llama(swiglu="no")
    assert not any("llama_kernels" in registry for registry in REGISTRIES)


@pytest.mark.parametrize("sm90", [False, True], ids=["cpu", "sm90-auto-sdpa"])
def test_compiled_model_matches(calls, sdpa_calls, monkeypatch, sm90):
    """torch.compile with fullgraph=True traces the patched model, the tag on the RoPE table included; on a
    (faked) sm90 the attention choice too (SDPA: a compiled graph cannot warn, that is left to eager calls)."""
    if sm90:
        from llama_kernels.ops import attention_choice

        monkeypatch.setattr(attention_choice, "target_of", lambda device: "sm90")
        monkeypatch.setattr(attention_choice, "_warned", set())  # nothing told yet: the compiled call would warn
    stock, model = twin_models()
    ids = torch.randint(1, TINY["vocab_size"], (2, 19))
    expected = logits(stock, ids)
    hf.patch_hf_llama(model)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    torch.testing.assert_close(logits(compiled, ids), expected, **TOL)
    torch.compiler.reset()
    # Attention too where transformers skips the causal mask when compiling (5.x); else sdpa takes the mask.
    assert (calls["rms_norm"], calls["fused"], calls["apply_rope"]) == (2 * LAYERS + 1, LAYERS, LAYERS)
    if sm90:
        assert sdpa_calls["sdpa"] == LAYERS and calls["flash_attention"] == 0


def test_models_built_before_and_after_the_patch_use_the_kernels(calls):
    ids = torch.randint(1, TINY["vocab_size"], (1, 7))
    before = LlamaForCausalLM(LlamaConfig(**TINY)).eval()
    assert hf.patch_hf_llama(before) is before
    assert before.config._attn_implementation == "llama_kernels"
    after = LlamaForCausalLM(LlamaConfig(**TINY, attn_implementation="llama_kernels")).eval()
    for model in (before, after):
        logits(model, ids)
    assert_ran_kernels(calls, forwards=2)

    sdpa = LlamaForCausalLM(LlamaConfig(**TINY, attn_implementation="sdpa")).eval()
    calls.clear()
    logits(sdpa, ids)  # its norms and RoPE are the kernels, its attention still sdpa
    assert (calls["rms_norm"], calls["apply_rope"], calls["flash_attention"]) == (2 * LAYERS + 1, LAYERS, 0)


def test_unpatch_restores_the_originals_and_patching_is_idempotent():
    originals = [vars(owner)[name] for owner, name in PATCHED]
    model = LlamaForCausalLM(LlamaConfig(**TINY))
    implementation = model.config._attn_implementation

    hf.patch_hf_llama(model)
    hf.patch_hf_llama(model)
    hf.patch_hf_llama()
    patched = [vars(owner)[name] for owner, name in PATCHED]
    assert all(new is not old for new, old in zip(patched, originals))
    assert inspect.signature(patched[1]) == inspect.signature(originals[1])  # the decoder layer's, as installed
    assert all("llama_kernels" in registry for registry in REGISTRIES)

    hf.unpatch_hf_llama()
    assert all(vars(owner)[name] is old for (owner, name), old in zip(PATCHED, originals))
    assert not any("llama_kernels" in registry for registry in REGISTRIES)
    assert model.config._attn_implementation == implementation
    hf.unpatch_hf_llama()  # nothing left to restore
    assert all(vars(owner)[name] is old for (owner, name), old in zip(PATCHED, originals))


@pytest.mark.parametrize("version", ["4.30.0", "6.0.0"])
def test_unsupported_transformers_version(monkeypatch, version):
    originals = [vars(owner)[name] for owner, name in PATCHED]
    # By name: transformers replaces its module object in sys.modules as its submodules load.
    monkeypatch.setattr("transformers.__version__", version)
    with pytest.raises(RuntimeError, match=rf"4\.50 to 5\.x.*transformers {version} is installed"):
        hf.patch_hf_llama()
    assert all(vars(owner)[name] is old for (owner, name), old in zip(PATCHED, originals))


# --------------------------------------------------------------------------- the attention choice
@pytest.fixture
def sdpa_calls(monkeypatch):
    """How often the patched attention handed a call to transformers' sdpa_attention_forward."""
    from transformers.integrations import sdpa_attention

    counts = collections.Counter()
    original = sdpa_attention.sdpa_attention_forward

    def spy(*args, **kwargs):
        counts["sdpa"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", spy)
    return counts


def test_attention_sdpa_gives_what_ours_gives(calls, sdpa_calls):
    """Prefill logits, greedy decoding over the cache and a training step's gradients, each choice forced."""
    _, model = twin_models()
    ids = torch.randint(1, TINY["vocab_size"], (2, 19))
    generate = dict(attention_mask=torch.ones_like(ids[:, :7]), max_new_tokens=4, do_sample=False)
    results = {}
    for choice in ("llama_kernels", "sdpa"):
        hf.patch_hf_llama(model, attention=choice)
        model.zero_grad()
        F.cross_entropy(model.train()(ids).logits.flatten(0, 1), ids.roll(-1, 1).flatten()).backward()
        results[choice] = (logits(model.eval(), ids), model.generate(ids[:, :7], **generate),
                           [p.grad.clone() for p in model.parameters()])
        ours, sdpa = calls["flash_attention"], sdpa_calls["sdpa"]
        runs = (2 + 4) * LAYERS  # the training and eval forwards, generate's prompt and its 3 decoding steps
        assert (ours, sdpa) == ((0, runs) if choice == "sdpa" else (runs, 0)), choice
        calls.clear()
        sdpa_calls.clear()
    (want_logits, want_ids, want_grads), (got_logits, got_ids, got_grads) = results["llama_kernels"], results["sdpa"]
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(got_ids, want_ids)
    for want, got in zip(want_grads, got_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_attention_auto_is_ours_on_the_cpu_and_sdpa_on_sm90_said_once_per_phase(calls, sdpa_calls, monkeypatch):
    from llama_kernels.ops import attention_choice

    _, model = twin_models()
    ids = torch.randint(1, TINY["vocab_size"], (1, 7))
    generate = dict(attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False)
    hf.patch_hf_llama(model, attention="auto")
    model.generate(ids, **generate)
    assert calls["flash_attention"] == 2 * LAYERS and sdpa_calls["sdpa"] == 0
    monkeypatch.setattr(attention_choice, "target_of", lambda device: "sm90")
    monkeypatch.setattr(attention_choice, "_warned", set())
    with pytest.warns(UserWarning) as told:
        model.generate(ids, **generate)
        model.generate(ids, **generate)
    messages = [str(w.message) for w in told if "attention='auto'" in str(w.message)]
    assert len(messages) == 2 and "the forward on sm90" in messages[0] and "the decode on sm90" in messages[1]
    assert sdpa_calls["sdpa"] == 4 * LAYERS and calls["flash_attention"] == 2 * LAYERS


@pytest.mark.parametrize("value, error", [("fast", ValueError), (1, TypeError), (None, TypeError)])
def test_an_unknown_attention_choice_is_refused(value, error):
    with pytest.raises(error, match=r"^attention: expected True, False or one of \('auto', 'llama_kernels', 'sdpa'\), "
                                    rf"got {value!r}"):
        hf.patch_hf_llama(attention=value)
    assert not any("llama_kernels" in registry for registry in REGISTRIES)

