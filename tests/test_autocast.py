"""Both models under ``torch.autocast("cpu", dtype=torch.bfloat16)``, as HF's Trainer and accelerate run the forward
with bf16=True: CodeLlama and the patched HF Llama against the unpatched HF Llama under the same autocast, in
inference and one training step (fp32 weights, their gradients).

Under autocast the projections give bf16 while the embedding and the residual stream stay fp32, so the norms take a
bf16 sublayer output and an fp32 residual. The three models round to bf16 at different places (HF rounds cos/sin and
q * cos to bf16, the kernels rotate in fp32 and round once; softmax and its products differ likewise), each a rounding
of at most an ulp, so the tolerances are in bf16 ulps (2**-7) of the largest value: logits within 2 (measured: 1.08),
each parameter's gradient within 4 of its largest element (measured: 2.2).
"""

import copy

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from llama_kernels import _native  # noqa: E402
from llama_kernels.models import CodeLlama, patch_hf_llama, unpatch_hf_llama  # noqa: E402
from llama_kernels.models.checkpoint import hf_to_meta_name  # noqa: E402
from llama_kernels.ops import _triton  # noqa: E402
from test_models import TINY  # noqa: E402

BF16_ULP = 2.0**-7
LOGIT_ULPS, GRAD_ULPS = 2, 4
BACKEND = "native" if _native.available("cpu") else "reference"  # not the interpreter conftest selects


def training_step(model, logits_of, tokens):
    """Logits (detached) and every parameter's gradient (by transformers' names) of one step under autocast."""
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = logits_of(model, tokens)
    F.cross_entropy(logits.float()[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).backward()
    return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def inference(model, logits_of, tokens):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        return logits_of(model, tokens)


def hf_logits(model, tokens):
    return model(tokens).logits


def our_logits(model, tokens):
    return model(tokens)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{"stock" | "patched" | "ours": (inference logits, training logits, gradients by transformers' names)}."""
    torch.manual_seed(0)
    stock = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY.to_hf_config()))
    with torch.no_grad():
        for name, p in stock.named_parameters():
            p.copy_(torch.randn_like(p) * 0.05 + (1.0 if name.endswith("norm.weight") else 0.0))
    directory = tmp_path_factory.mktemp("hf")
    stock.save_pretrained(directory)
    ours = CodeLlama.from_pretrained(directory, dtype=torch.float32, backend=BACKEND)
    tokens = torch.randint(0, TINY.vocab_size, (2, 19))

    def run(model, logits_of):
        return (inference(model, logits_of, tokens), *training_step(model, logits_of, tokens))

    results = {"stock": run(stock, hf_logits)}  # before patching: the patch is class-wide
    patched = patch_hf_llama(copy.deepcopy(stock))
    try:
        with pytest.MonkeyPatch.context() as mp:  # the patched ops' default CPU backend: native, not the interpreter
            mp.setattr(_triton, "INTERPRET", False)
            results["patched"] = run(patched, hf_logits)
    finally:
        unpatch_hf_llama()
    logits, training_logits, grads = run(ours, our_logits)
    by_meta_name = {name: hf_to_meta_name(name) for name in results["stock"][2]}
    results["ours"] = (logits, training_logits, {name: grads[meta] for name, meta in by_meta_name.items()})
    return results


def within_ulps(got, want, ulps):
    assert got.shape == want.shape and not got.isnan().any()
    scale = want.float().abs().max()
    err = (got.float() - want.float()).abs().max()
    assert err <= ulps * BF16_ULP * scale, f"{err / (BF16_ULP * scale):.2f} bf16 ulps of the largest value"


@pytest.mark.parametrize("model", ["ours", "patched"])
def test_inference_logits_match_unpatched_hf_under_autocast(runs, model):
    got, want = runs[model][0], runs["stock"][0]
    assert got.dtype == want.dtype == torch.bfloat16  # autocast ran the output projection in bf16
    within_ulps(got, want, LOGIT_ULPS)
    assert not torch.equal(got, want)  # the kernels ran (not transformers' own code)


@pytest.mark.parametrize("model", ["ours", "patched"])
def test_training_step_matches_unpatched_hf_under_autocast(runs, model):
    logits, grads = runs[model][1:]
    want_logits, want_grads = runs["stock"][1:]
    within_ulps(logits, want_logits, LOGIT_ULPS)
    assert grads.keys() == want_grads.keys()
    for name, want in want_grads.items():
        assert grads[name].dtype == torch.float32, name  # fp32 weights keep fp32 gradients
        assert want.abs().max() > 0, name
        within_ulps(grads[name], want, GRAD_ULPS)


def test_generate_under_autocast_follows_the_full_forward():
    """Decoding under autocast: the cache is made in bf16, and each greedy token is the argmax of the full
    forward's last logits under the same autocast."""
    from test_models import tiny_model

    model = tiny_model(backend=BACKEND)
    prompt = [7, 8, 9, 10]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.new_cache(1, 8).k[0].dtype == torch.bfloat16
        new = model.generate([prompt], max_new_tokens=5)[0]
        tokens = list(prompt)
        with torch.no_grad():
            for _ in range(5):
                tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
    assert new == tokens[len(prompt):]
