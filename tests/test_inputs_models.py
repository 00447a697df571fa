"""Bad input to the model layer (configs, checkpoints, generate, the HF patch): the right result, or a
TypeError / ValueError whose message names the argument, the field or the path (issue 12).

The models are test_models' tiny ones on the C++ CPU kernels (the reference where the extension is not built):
conftest's TRITON_INTERPRET=1 would otherwise send CPU tensors through the slow Triton interpreter.
"""

import copy
import json
import warnings

import pytest
import torch

from llama_kernels import _native
from llama_kernels.models import CodeLlama, CodeLlamaConfig, hf, patch_hf_llama, unpatch_hf_llama
from test_checkpoint import PARAMS, hf_config, hf_permuted, to_hf_names, write_hf, write_meta
from test_models import TINY, tiny_model

BACKEND = "native" if _native.available("cpu") else "reference"


@pytest.fixture(scope="module")
def model():
    return tiny_model(backend=BACKEND)


@pytest.fixture(scope="module")
def hf_state():
    """The tiny model's weights under transformers' names (the layout write_hf writes)."""
    return to_hf_names(hf_permuted(tiny_model(config=CodeLlamaConfig.from_meta_params(PARAMS)).state_dict()))


# --------------------------------------------------------------------------- generate, then train
def test_generate_then_checkpointed_training(model):
    """generate's inference mode must leave nothing (the cached inv_freq) that training cannot save for backward:
    the gradients after a generate are those of a model that never generated."""
    fresh = copy.deepcopy(model)
    model.generate([[1, 2, 3]], max_new_tokens=2)
    tokens = torch.randint(0, TINY.vocab_size, (2, 9))
    grads = []
    for m in (model, fresh):
        m.train()
        m.activation_checkpointing = True
        m.zero_grad()
        m(tokens).float().square().mean().backward()
        grads.append(m.layers[0].attention.wq.weight.grad)
        m.eval()
        m.activation_checkpointing = False
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


# --------------------------------------------------------------------------- what the model does not implement
@pytest.mark.parametrize("changes,match", [
    ({"hidden_act": "gelu"}, r"^config\.json: hidden_act: this model implements only 'silu', got 'gelu'"),
    ({"attention_bias": True}, r"^config\.json: attention_bias"),
    ({"mlp_bias": True}, r"^config\.json: mlp_bias"),
    ({"attention_dropout": 0.1}, r"^config\.json: attention_dropout"),
    ({"model_type": "mistral"}, r"^config\.json: model_type"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e6}}, r"^config\.json: rope_scaling: .*longrope"),
    ({"head_dim": 32}, r"^config\.json: head_dim: expected hidden_size / num_attention_heads = 64"),
], ids=["gelu", "attention-bias", "mlp-bias", "dropout", "model-type", "longrope", "head-dim"])
def test_hf_config_fields_the_model_does_not_implement_are_refused(changes, match):
    with pytest.raises(ValueError, match=match):
        CodeLlamaConfig.from_hf_config(hf_config(**changes))


def test_rope_types_the_model_does_not_run_are_refused():
    """dynamic NTK recomputes the frequencies per call length (the model computes them once); YaRN's attention
    factor scales the scores (the model does not apply it): both refused when the model is built."""
    dynamic = CodeLlamaConfig.from_hf_config(hf_config(rope_scaling={"rope_type": "dynamic", "factor": 2.0}))
    with pytest.raises(ValueError, match=r"^config\.rope_scaling: rope_type 'dynamic'"):
        CodeLlama(dynamic)
    yarn = CodeLlamaConfig.from_hf_config(hf_config(rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                                  "original_max_position_embeddings": 4096}))
    with pytest.raises(ValueError, match=r"^config\.rope_scaling: .* also scales attention"):
        CodeLlama(yarn)


@pytest.mark.parametrize("changes,match", [
    ({"use_scaled_rope": True}, r"^params\.json: use_scaled_rope"),
    ({"sliding_window": 4096}, r"^params\.json: sliding_window: not a field"),
], ids=["scaled-rope", "unknown-key"])
def test_meta_params_the_model_does_not_implement_are_refused(changes, match):
    with pytest.raises(ValueError, match=match):
        CodeLlamaConfig.from_meta_params({**PARAMS, **changes})


# --------------------------------------------------------------------------- generate's prompts
def test_float_token_ids_are_refused_not_truncated(model):
    with pytest.raises(TypeError, match=r"^prompts\[0\]\[0\]: expected a token id \(int\), got 1\.5"):
        model.generate([[1.5, 2]], max_new_tokens=1)


def test_prompts_as_an_integer_tensor(model):
    """A 2-D integer tensor is one prompt a row; anything else tensor-shaped is refused."""
    prompts = torch.randint(0, TINY.vocab_size, (2, 5))
    assert model.generate(prompts, max_new_tokens=3) == model.generate(prompts.tolist(), max_new_tokens=3)
    for bad in (prompts[0], prompts.float()):
        with pytest.raises(TypeError, match=r"^prompts: expected a 2-D integer tensor"):
            model.generate(bad, max_new_tokens=1)


# --------------------------------------------------------------------------- the patched HF model in float64
def test_patched_hf_llama_in_float64_runs_transformers_code_and_says_so(monkeypatch):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setattr(hf, "_warned", set())
    stock = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY.to_hf_config())).double().eval()
    tokens = torch.randint(0, TINY.vocab_size, (2, 7))
    with torch.no_grad():
        want = stock(tokens).logits
        patch_hf_llama(stock)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                got = [stock(tokens).logits for _ in range(2)]
        finally:
            unpatch_hf_llama()
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "torch.float64" in messages[0] and "LlamaRMSNorm" in messages[0], messages
    for logits in got:
        torch.testing.assert_close(logits, want, rtol=0, atol=0)  # the same code: bit for bit


# --------------------------------------------------------------------------- errors naming the argument
@pytest.mark.parametrize("call,error,match", [
    (lambda: CodeLlamaConfig.from_name(None), TypeError, r"^name: expected"),
    (lambda: CodeLlamaConfig(dim=256, n_heads=0), ValueError, r"^n_heads: expected a positive int, got 0"),
    (lambda: CodeLlamaConfig(dim=256, n_heads=4, multiple_of=0), ValueError, r"^multiple_of: expected a positive"),
    (lambda: CodeLlamaConfig(dim=256, n_heads=4, n_kv_heads=0), ValueError, r"^n_kv_heads: expected a positive"),
    (lambda: CodeLlamaConfig(dim=256, n_heads=4, norm_eps=float("nan")), ValueError, r"^norm_eps"),
    (lambda: CodeLlama("CodeLlama-7b"), TypeError, r"^config: expected a CodeLlamaConfig"),
], ids=["from-name-none", "zero-heads", "zero-multiple-of", "zero-kv-heads", "nan-eps", "config-a-string"])
def test_config_errors_name_the_field(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("params,error,match", [
    ({"dim": "128"}, TypeError, r"^dim: expected a positive int, got '128'"),
    ({"n_heads": 0}, ValueError, r"^n_heads: expected a positive int, got 0"),
    ({"n_kv_heads": 0}, ValueError, r"^n_kv_heads: expected a positive int, got 0"),
    ({"multiple_of": 0}, ValueError, r"^multiple_of: expected a positive int, got 0"),
    ({"vocab_size": "100"}, TypeError, r"^vocab_size: expected a positive int, got '100'"),
    ({"norm_eps": None}, TypeError, r"^norm_eps: expected a finite number > 0, got None"),
    ({"dim": None}, TypeError, r"^dim: expected a positive int, got None"),
], ids=["dim-string", "zero-heads", "zero-kv-heads", "zero-multiple-of", "vocab-string", "eps-null", "dim-null"])
def test_meta_params_errors_name_the_field(params, error, match):
    with pytest.raises(error, match=match):
        CodeLlamaConfig.from_meta_params({**PARAMS, **params})


def test_meta_params_without_dim_is_blamed_on_dim_not_the_shards(tmp_path):
    state = tiny_model(config=CodeLlamaConfig.from_meta_params(PARAMS)).state_dict()
    params = {k: v for k, v in PARAMS.items() if k != "dim"}
    with pytest.raises(ValueError, match=r"^params\.json: dim: missing"):
        CodeLlama.from_pretrained(write_meta(tmp_path, state, n_shards=2, params=params), dtype=None)


@pytest.mark.parametrize("config,error,match", [
    ({"hidden_size": None}, ValueError, r"^config\.json: hidden_size: missing"),
    ({"num_attention_heads": "4"}, TypeError, r"^config\.json: num_attention_heads: expected a positive int"),
    ({"num_attention_heads": 4.0}, TypeError, r"^config\.json: num_attention_heads: expected a positive int"),
    ({"rms_norm_eps": "1e-6"}, TypeError, r"^config\.json: rms_norm_eps: expected a finite number"),
    ([1, 2], ValueError, r"config\.json\)?, got a JSON list"),
], ids=["no-hidden-size", "heads-string", "heads-float", "eps-string", "json-list"])
def test_hf_config_errors_name_the_field(tmp_path, config, error, match):
    if isinstance(config, dict):
        config = {k: v for k, v in hf_config(**config).items() if v is not None}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    with pytest.raises(error, match=match):
        CodeLlamaConfig.from_hf_config(path)


@pytest.mark.parametrize("damage", [lambda data: b"", lambda data: data[:-1000]], ids=["empty", "truncated"])
def test_an_unreadable_safetensors_file_is_named(tmp_path, hf_state, damage):
    path = write_hf(tmp_path / "hf", hf_state) / "model.safetensors"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors file"):
        CodeLlama.from_pretrained(path.parent)


@pytest.mark.parametrize("dtype,match", [(torch.int32, r"got torch\.int32"), ("bf16", r"got 'bf16'")],
                         ids=["int32", "string"])
def test_from_pretrained_dtype_is_checked(tmp_path, hf_state, dtype, match):
    with pytest.raises(TypeError, match=r"^dtype: expected None or one of torch\.float16, .*" + match):
        CodeLlama.from_pretrained(write_hf(tmp_path / "hf", hf_state), dtype=dtype)


def test_stored_dtypes_with_dtype_none(tmp_path, hf_state):
    """dtype=None keeps the stored dtypes: integer weights are refused, mixed fp16/fp32 weights are refused (the
    model would fail at its first forward), and dtype= given converts the mixed checkpoint to one dtype."""
    ints = {**hf_state, "model.norm.weight": hf_state["model.norm.weight"].long()}
    with pytest.raises(ValueError, match=r"model\.norm\.weight: expected floating-point weights, got torch\.int64"):
        CodeLlama.from_pretrained(write_hf(tmp_path / "ints", ints), dtype=None)
    mixed = {name: t.half() if "layers.1." in name else t for name, t in hf_state.items()}
    directory = write_hf(tmp_path / "mixed", mixed)
    with pytest.raises(ValueError, match=r"^dtype: None keeps the weights' stored dtype, .* torch\.float32 .* "
                                         r"torch\.float16 .*; pass dtype="):
        CodeLlama.from_pretrained(directory, dtype=None)
    loaded = CodeLlama.from_pretrained(directory, dtype=torch.float32)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}


@pytest.mark.parametrize("tokens,match", [([[1, TINY.vocab_size]], r"^prompts\[0\]\[1\]: .* got 300"),
                                          ([[3], [-1]], r"^prompts\[1\]\[0\]: .* got -1")],
                         ids=["past-vocab", "negative"])
def test_token_ids_outside_the_vocabulary_are_refused(model, tokens, match):
    with pytest.raises(ValueError, match=match):
        model.generate(tokens, max_new_tokens=1)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"max_new_tokens": 2.5}, TypeError, r"^max_new_tokens: expected a positive int, got 2\.5"),
    ({"max_new_tokens": None}, TypeError, r"^max_new_tokens: expected a positive int, got None"),
    ({"max_new_tokens": 10**12}, ValueError, r"^max_new_tokens: .* exceeds the model's max_seq_len = 16384"),
    ({"max_new_tokens": 2, "temperature": float("nan")}, ValueError, r"^temperature: expected a finite number"),
    ({"max_new_tokens": 2, "max_seq_len": 2.0}, TypeError, r"^max_seq_len: expected a positive int"),
], ids=["max-new-float", "max-new-none", "max-new-huge", "temperature-nan", "max-seq-len-float"])
def test_generate_arguments_are_checked(model, kwargs, error, match):
    with pytest.raises(error, match=match):
        model.generate([[1, 2]], **kwargs)


@pytest.mark.parametrize("bad", [torch.nn.Linear(2, 2), "LlamaForCausalLM"], ids=["linear", "string"])
def test_patch_hf_llama_refuses_what_is_not_a_llama_model(bad):
    pytest.importorskip("transformers")
    from transformers.models.llama import modeling_llama

    forward = modeling_llama.LlamaRMSNorm.forward
    with pytest.raises(TypeError, match=r"^model: expected a transformers Llama model"):
        patch_hf_llama(bad)
    assert modeling_llama.LlamaRMSNorm.forward is forward  # refused before anything was patched
