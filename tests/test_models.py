"""CodeLlama on the kernels against the same module on llama_kernels.reference, and its generation.

A tiny Code Llama-shaped config (RoPE base 1e6, grouped key/value heads, head_dim 64,
two layers) keeps the interpreter fast; every weight, the norms' included, is random.
"""

import pytest
import torch

from llama_kernels import _native
from llama_kernels.models import CodeLlama, CodeLlamaConfig, generate, infill
from llama_kernels.models.tokenizer import CodeLlamaTokenizer, infilling_prompt
from test_checkpoint import PARAMS, hf_permuted, to_hf_names, write_hf, write_meta
from test_tokenizer import INFILLING, train
from utils import assert_close

TINY = CodeLlamaConfig(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, multiple_of=32)


def tiny_model(dtype=torch.float32, config=TINY, **kwargs) -> CodeLlama:
    model = CodeLlama(config, **kwargs)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, 0.05)
    return model.to(dtype)


def logits_both_ways(model, *args, **kwargs):
    model.backend = "triton"
    ours = model(*args, **kwargs)
    model.backend = "reference"
    return ours, model(*args, **kwargs)


# --------------------------------------------------------------------------- forward and backward
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize("seqlen", [1, 7, 19])
def test_logits_match_reference_fp32(seqlen, interleaved):
    model = tiny_model(rope_interleaved=interleaved)
    tokens = torch.randint(0, TINY.vocab_size, (2, seqlen))
    ours, ref = logits_both_ways(model, tokens)
    assert ours.shape == (2, seqlen, TINY.vocab_size)
    assert_close(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_native_backend_matches_reference(dtype, interleaved):
    """The model on the C++ CPU kernels: logits and greedy tokens as on the reference."""
    if not _native.available("cpu"):
        pytest.skip("the native extension is not built")
    model = tiny_model(dtype, rope_interleaved=interleaved)
    tokens = torch.randint(0, TINY.vocab_size, (2, 19))
    outs = {}
    for backend in ("native", "reference"):
        model.backend = backend
        outs[backend] = (model(tokens), model.generate(tokens[:, :7].tolist(), max_new_tokens=6))
    (ours, ours_new), (ref, ref_new) = outs["native"], outs["reference"]
    if dtype == torch.float32:
        assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    else:  # the C++ kernels round as torch does: within an ulp of the reference at each step
        assert (ours.float() - ref.float()).abs().max() <= 4 * 2**-7 * ref.float().abs().max()
    assert ours_new == ref_new


def test_logits_match_reference_bf16():
    """bf16 end to end: each kernel is within an ulp or two of the reference, and the two layers' roundings
    compound; the logits stay within 4 bf16 ulps of their largest value (measured: 3) and the argmax agrees."""
    model = tiny_model(torch.bfloat16)
    tokens = torch.randint(0, TINY.vocab_size, (2, 19))
    ours, ref = logits_both_ways(model, tokens)
    assert ours.dtype == torch.bfloat16
    err = (ours.float() - ref.float()).abs().max().item()
    assert err <= 4 * 2**-7 * ref.float().abs().max().item(), err
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.95


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "activation-checkpointing"])
def test_gradients_match_reference(checkpointing):
    model = tiny_model()
    model.train()
    model.activation_checkpointing = checkpointing
    tokens = torch.randint(0, TINY.vocab_size, (2, 13))
    grads = []
    for backend in ("triton", "reference"):
        model.backend = backend
        model.zero_grad()
        logits = model(tokens[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    for name, g in grads[0].items():
        scale = grads[1][name].abs().max().item()
        assert_close(g, grads[1][name], rtol=1e-4, atol=1e-4 * max(scale, 1e-3))


@pytest.mark.parametrize("backend, checkpointing", [("triton", False), ("native", True)],
                         ids=["triton", "native-activation-checkpointing"])
def test_loss_with_targets_equals_the_cross_entropy_of_the_logits(checkpointing, backend):
    """model(tokens, targets=...) against F.cross_entropy(model(tokens)) on the reference: the loss and every
    gradient, -100 targets left out of the mean; the logits are never built (the output layer never runs)."""
    if backend == "native" and not _native.available("cpu"):
        pytest.skip("the native extension is not built")
    model = tiny_model()
    model.train()
    model.activation_checkpointing = checkpointing
    tokens = torch.randint(0, TINY.vocab_size, (2, 13))
    inputs, targets = tokens[:, :-1], tokens[:, 1:].clone()
    targets[0, :5] = targets[1, -2:] = -100  # a prompt's positions, a padded tail
    results = []
    for backend_now, loss_of in ((backend, lambda: model(inputs, targets=targets)),
                                 ("reference", lambda: torch.nn.functional.cross_entropy(
                                     model(inputs).flatten(0, 1), targets.flatten()))):
        model.backend = backend_now
        model.zero_grad()
        loss = loss_of()
        loss.backward()
        results.append((loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}))
    (loss, grads), (want_loss, want_grads) = results
    assert loss.shape == () and loss.dtype == torch.float32
    assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    for name, g in grads.items():
        scale = want_grads[name].abs().max().item()
        assert_close(g, want_grads[name], rtol=1e-4, atol=1e-4 * max(scale, 1e-3))

    built = []
    model.output.register_forward_hook(lambda *_: built.append(True))
    model.backend = backend
    model(inputs, targets=targets)
    assert not built


def test_logits_at_positions_equal_the_full_logits():
    model = tiny_model(backend="triton")
    tokens = torch.randint(0, TINY.vocab_size, (3, 11))
    at = torch.tensor([10, 0, 4])
    full = model(tokens)
    assert_close(model(tokens, logits_at=at)[:, 0], full[torch.arange(3), at])


# --------------------------------------------------------------------------- the KV cache and generation
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_cached_steps_equal_the_full_forward(backend):
    """Prefill 9 tokens, then 3 steps of one and one step of 2: the cache's logits equal one uncached forward."""
    model = tiny_model(backend=backend, rope_interleaved=True)
    tokens = torch.randint(0, TINY.vocab_size, (2, 14))
    full = model(tokens)
    cache = model.new_cache(2, 16)
    pieces = [model(tokens[:, :9], cache=cache)]
    for start, stop in ((9, 10), (10, 11), (11, 12), (12, 14)):
        pieces.append(model(tokens[:, start:stop], cache=cache))
    assert cache.filled == 14 and cache.seqlens.tolist() == [14, 14]
    assert_close(torch.cat(pieces, dim=1), full, rtol=1e-4, atol=1e-4)


def test_greedy_generation_is_identical_on_both_backends():
    model = tiny_model()
    prompts = [[1, 5, 9, 200, 17], [3, 4], [250, 251, 252, 253, 254, 255, 256, 257]]
    outs = []
    for backend in ("triton", "reference"):
        model.backend = backend
        outs.append(model.generate(prompts, max_new_tokens=8))
    assert outs[0] == outs[1]
    assert all(len(row) == 8 for row in outs[0])


def test_batched_prompts_of_different_lengths_equal_each_alone():
    """Right padding must not leak: each prompt of a batch generates what it generates alone."""
    model = tiny_model(backend="triton")
    prompts = [[1, 5, 9, 200, 17, 8, 2], [3, 4], [250]]
    batched = model.generate(prompts, max_new_tokens=5)
    assert batched == [model.generate([p], max_new_tokens=5)[0] for p in prompts]


def test_greedy_generation_follows_the_argmax_of_the_full_forward():
    model = tiny_model(backend="reference")
    prompt = [7, 8, 9, 10]
    new = generate(model, [prompt], max_new_tokens=6)[0]
    tokens = list(prompt)
    for _ in range(6):
        tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
    assert new == tokens[len(prompt):]


def test_stop_tokens_end_each_sequence():
    model = tiny_model(backend="reference")
    prompts = [[1, 2, 3], [4, 5]]
    free = model.generate(prompts, max_new_tokens=6)
    stop = free[0][2]  # the third token of the first sequence; each sequence ends before its first occurrence
    stopped = model.generate(prompts, max_new_tokens=6, stop_tokens={stop})
    for row_stopped, row_free in zip(stopped, free):
        assert row_stopped == (row_free[:row_free.index(stop)] if stop in row_free else row_free)


def test_top_p_sampling_is_reproducible_and_stays_in_the_nucleus():
    model = tiny_model(backend="reference")
    runs = [model.generate([[1, 2, 3]], max_new_tokens=6, temperature=0.8, top_p=0.9,
                           generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert runs[0] == runs[1]
    # top_p small enough keeps only the most likely token: sampling becomes greedy
    assert model.generate([[1, 2, 3]], max_new_tokens=6, temperature=1.0, top_p=1e-6) == \
        model.generate([[1, 2, 3]], max_new_tokens=6)


@pytest.fixture(scope="module")
def sentencepiece_tokenizer(tmp_path_factory):
    """A tiny SentencePiece model in Llama's configuration with Code Llama's four infilling pieces."""
    return CodeLlamaTokenizer(train(tmp_path_factory.mktemp("sp"), INFILLING + ["☺"]))


@pytest.mark.parametrize("suffix_first", [False, True], ids=["prefix-suffix-middle", "suffix-prefix-middle"])
def test_infill_generates_from_the_infilling_prompt(sentencepiece_tokenizer, suffix_first):
    tok = sentencepiece_tokenizer
    model = tiny_model(config=CodeLlamaConfig(dim=256, n_layers=2, n_heads=4, n_kv_heads=2,
                                              vocab_size=tok.vocab_size, multiple_of=32), backend="reference")
    prefix, suffix = "def f(x):\n    ", "\n    return y\n"
    prompt = infilling_prompt(tok, prefix, suffix, suffix_first=suffix_first)
    middle = generate(model, [prompt], 6, stop_tokens={tok.eos_id, tok.eot_id})[0]
    assert infill(model, tok, prefix, suffix, suffix_first=suffix_first, max_new_tokens=6) == \
        tok.decode_infilling(middle)


def test_infill_ends_at_the_end_of_infill_token(sentencepiece_tokenizer):
    tok = sentencepiece_tokenizer
    model = tiny_model(config=CodeLlamaConfig(dim=256, n_layers=2, n_heads=4, n_kv_heads=2,
                                              vocab_size=tok.vocab_size, multiple_of=32), backend="reference")
    steps = []

    def eot_from_the_third_step(module, inputs, logits):  # the model "decides" the middle is 2 tokens long
        steps.append(1)
        if len(steps) >= 3:
            logits = logits.clone()
            logits[..., tok.eot_id] = 1e4
        return logits

    model.output.register_forward_hook(eot_from_the_third_step)
    free = generate(model, [infilling_prompt(tok, "a = ", "\n")], 2)[0]
    steps.clear()
    assert infill(model, tok, "a = ", "\n", max_new_tokens=20) == tok.decode_infilling(free)
    assert len(steps) == 3  # prefill, two steps; the EOT ended it


# --------------------------------------------------------------------------- configs
def test_published_variants():
    expected = {  # name: (dim, layers, heads, kv heads, FFN width, vocabulary)
        "CodeLlama-7b": (4096, 32, 32, 32, 11008, 32016),
        "CodeLlama-7b-Python": (4096, 32, 32, 32, 11008, 32000),
        "CodeLlama-13b-Instruct": (5120, 40, 40, 40, 13824, 32016),
        "CodeLlama-34b": (8192, 48, 64, 8, 22016, 32000),
        "CodeLlama-70b": (8192, 80, 64, 8, 28672, 32016),
        "codellama/CodeLlama-70b-Python-hf": (8192, 80, 64, 8, 28672, 32016),
    }
    for name, want in expected.items():
        c = CodeLlamaConfig.from_name(name)
        assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.hidden_dim, c.vocab_size) == want, name
        assert c.rope_theta == 1e6 and c.norm_eps == 1e-5 and c.max_seq_len == 16384


def test_configs_round_trip_through_meta_and_hf_files():
    for name in ("CodeLlama-7b", "CodeLlama-34b-Python", "CodeLlama-70b-Instruct"):
        c = CodeLlamaConfig.from_name(name)
        hf = CodeLlamaConfig.from_hf_config(c.to_hf_config())
        meta = CodeLlamaConfig.from_meta_params({k: v for k, v in c.to_dict().items() if v is not None})
        for other in (hf, meta):
            assert (other.dim, other.n_layers, other.n_heads, other.n_kv_heads, other.hidden_dim, other.vocab_size,
                    other.rope_theta) == (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.hidden_dim, c.vocab_size,
                                          c.rope_theta)


# --------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: CodeLlamaConfig.from_name("CodeLlama-8b"), ValueError, r"^name: unknown Code Llama variant"),
        (lambda: CodeLlamaConfig(dim=256, n_heads=4, n_kv_heads=3), ValueError, r"^n_kv_heads"),
        (lambda: CodeLlamaConfig.from_meta_params({"dim": 256, "n_layers": 1, "n_heads": 4, "vocab_size": -1}),
         ValueError, r"vocab_size"),
        (lambda: tiny_model().generate([[1] * 10], max_new_tokens=8, max_seq_len=16), ValueError,
         r"^prompts: .* does not fit the cache"),
        (lambda: tiny_model()(torch.ones(1, 9, dtype=torch.long), cache=tiny_model().new_cache(1, 8)), ValueError,
         r"^tokens: 9 more tokens after 0 would overflow the cache of 8"),
        (lambda: tiny_model()(torch.ones(2, 3)), ValueError, r"^tokens: expected an integer tensor"),
        (lambda: tiny_model().generate([[1], []], max_new_tokens=2), ValueError, r"^prompts"),
        (lambda: CodeLlama(TINY, backend="cutlass"), ValueError, r"^backend"),
        (lambda: tiny_model()(torch.ones(2, 3, dtype=torch.long), targets=torch.ones(2, 4, dtype=torch.long)),
         ValueError, r"^targets: expected tokens' shape \(2, 3\), got \(2, 4\)"),
        (lambda: tiny_model()(torch.ones(2, 3, dtype=torch.long), targets=torch.ones(2, 3)), TypeError, r"^targets"),
        (lambda: tiny_model()(torch.ones(1, 3, dtype=torch.long), targets=torch.ones(1, 3, dtype=torch.long),
                              cache=tiny_model().new_cache(1, 8)), ValueError, r"^targets: expected no cache"),
    ],
    ids=["unknown-variant", "kv-heads", "meta-vocab", "prompt-longer-than-cache", "cache-overflow", "float-tokens",
         "empty-prompt", "backend", "targets-shape", "float-targets", "targets-with-cache"],
)
def test_refusals(call, error, match):
    with pytest.raises(error, match=match):
        call()


# --------------------------------------------------------------------------- checkpoints
def test_meta_and_hugging_face_checkpoints_of_the_same_weights_give_equal_logits(tmp_path):
    """The same weights in Meta's layout (sharded in two, interleaved RoPE pairs) and in Hugging Face's (wq and wk
    rows permuted by the conversion, half-split pairs): each loads with its own RoPE layout, and the logits agree."""
    state = tiny_model(config=CodeLlamaConfig.from_meta_params(PARAMS)).state_dict()
    meta = CodeLlama.from_pretrained(write_meta(tmp_path / "meta", state, n_shards=2), dtype=None, backend="triton")
    hf = CodeLlama.from_pretrained(write_hf(tmp_path / "hf", to_hf_names(hf_permuted(state))), dtype=None,
                                   backend="triton")
    assert meta.rope_interleaved and not hf.rope_interleaved
    tokens = torch.randint(0, PARAMS["vocab_size"], (2, 17))
    meta_logits = meta(tokens)
    assert_close(hf(tokens), meta_logits, rtol=1e-4, atol=1e-4)
    # The error the layout flag prevents: Hugging Face's weights run with Meta's pairs give another model.
    hf.layers[0].attention.rope_interleaved = True
    assert (hf(tokens) - meta_logits).abs().max() > 1e-2


def test_loads_a_hugging_face_llama_and_matches_it(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = CodeLlamaConfig.from_meta_params(PARAMS)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config.to_hf_config())).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(torch.randn_like(p) * 0.05 + (1.0 if name.endswith("norm.weight") else 0.0))
    hf.save_pretrained(tmp_path)
    ours = CodeLlama.from_pretrained(tmp_path, dtype=None, backend="triton")
    tokens = torch.randint(0, PARAMS["vocab_size"], (2, 17))
    with torch.no_grad():
        want = hf(tokens).logits
    assert_close(ours(tokens), want, rtol=1e-4, atol=1e-4)
    prompt = tokens[:1, :9]
    with torch.no_grad():
        hf_new = hf.generate(prompt, max_new_tokens=8, do_sample=False, min_new_tokens=8)[0, 9:].tolist()
    assert ours.generate(prompt.tolist(), max_new_tokens=8) == [hf_new]


# --------------------------------------------------------------------------- llama-kernels validate
@pytest.mark.parametrize("variant", ["CodeLlama-7b", "CodeLlama-34b"])
def test_validate_prints_its_report(variant, capsys):
    from llama_kernels.models import validate

    assert validate.main(["--config", variant, "--tokens", "24", "--new-tokens", "4"]) == 0
    report = capsys.readouterr().out
    heads = "8/8 heads of 128" if variant == "CodeLlama-7b" else "8/1 heads of 128"  # 34B: 8 query heads a KV head
    assert heads in report
    for line in ("layer 0 ", "layer 1 ", "logits ", "next-token predictions agree at 100.0%",
                 "greedy generation: the same 4 tokens"):
        assert line in report, report


def test_model_backends_are_the_ops_backends():
    """Any of the ops' backends (or None) is a model's; an op without kernels of the extension's backend runs the
    reference in their place on the CPU and Triton on the card."""
    from llama_kernels.ops._backend import BACKENDS, for_op

    model = tiny_model()
    for backend in (None, *BACKENDS):
        model.backend = backend
        assert model.layers[0].feed_forward.backend == backend
    with pytest.raises(ValueError, match="backend: expected None or one of"):
        model.backend = "cuDNN"
    assert for_op("native", "swiglu") == "native" and for_op("cuda", "flash_attention") == "triton"
    assert for_op("native", "rms_norm") == "native" and for_op("cuda", "rope") == "cuda"
    assert for_op("triton", "swiglu") == "triton" and for_op(None, "swiglu") is None
