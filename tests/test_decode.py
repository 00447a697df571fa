"""flash_attention_with_kvcache (the Triton kernels: interpreted on CPU; the C++ ones) against the reference, on
--device.

The expected result is built independently, batch entry by batch entry: the new k and v
are written into copies of the caches at cache_seqlens[b] (k, and q, rotated first by
reference.apply_rope at positions cache_seqlens[b] + i when RoPE is asked for), then
reference.attention runs over the first L_b = cache_seqlens[b] (+ Sq with an append)
positions, causal aligned bottom-right. Cache positions past L_b hold random values, so a
kernel that reads past the end shows. In bf16 with RoPE, o and lse are expected over the RoPE
kernel's rotation instead (see kernel_rotation); the appended keys are still held to the
reference's rotation within an ulp.

Sizes are kept small for the interpreter (~8 ms per program and loop step): batch <= 3,
S_max <= 320, Sq 1 or 5 (one case 17, for more (query, head) rows than one program holds);
two cases reach 300 cached tokens in a ragged batch [0, 1, 300]. The file runs in ~15 s.
"""

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import llama_kernels as lk
from llama_kernels import reference as ref
from llama_kernels.rope_scaling import rope_inv_freq
from utils import assert_close, check_attention_out, check_lse, extension_backends, kernel_backends, randn

pytestmark = pytest.mark.usefixtures("poison_outputs")

F32, BF16 = torch.float32, torch.bfloat16
I32 = torch.int32
BACKENDS = kernel_backends("flash_attention_with_kvcache")


# --------------------------------------------------------------------------- helpers
def check_rotated(got, want):
    """RoPE output: within an ulp of the reference's rotation (the rope tests' tolerance)."""
    assert_close(got, want, ulps=1, atol=1e-5)


def rope_kwargs(rope, head_dim, device):
    """The RoPE arguments of the call for a case's rope setting, and the inv_freq and layout they mean."""
    if rope is None:
        return {}, None, False
    interleaved = rope.endswith("interleaved")
    if rope.startswith("theta"):
        return {"rope_theta": 1e4, "interleaved": interleaved}, rope_inv_freq(head_dim, 1e4, device=device), interleaved
    assert rope.startswith("inv_freq"), rope
    inv_freq = rope_inv_freq(head_dim, 1e6, {"rope_type": "linear", "factor": 4.0}, device=device)
    return {"inv_freq": inv_freq, "interleaved": interleaved}, inv_freq, interleaved


def make_inputs(batch, s_max, hq, hk, d, dtype, seqlens, sq, append, device):
    def new(*shape):
        return randn(*shape, dtype=dtype, device=device)

    q, k_cache, v_cache = new(batch, sq, hq, d), new(batch, s_max, hk, d), new(batch, s_max, hk, d)
    k = new(batch, sq, hk, d) if append else None
    v = new(batch, sq, hk, d) if append else None
    return q, k_cache, v_cache, torch.tensor(seqlens, dtype=I32, device=device), k, v


def kernel_rotation(q, k, positions, inv_freq, interleaved, backend="triton"):
    """The package's RoPE kernel (lk.apply_rope on ``backend``), held here within an ulp of reference.apply_rope.

    In bf16 the two can differ by an ulp (the interpreter rounds toward zero), and attention over
    a few keys turns one ulp of q or k into more than two ulp of o and ~1e-2 of lse. So the bf16
    expectations of o and lse attend over these rotated values; the cache check still holds the
    appended keys to reference.apply_rope.
    """
    got = lk.apply_rope(q, k, positions, inv_freq=inv_freq, interleaved=interleaved, backend=backend)
    for a, b in zip(got, ref.apply_rope(q, k, positions, inv_freq, interleaved)):
        check_rotated(a, b)
    return got


def expected(q, k_cache, v_cache, cache_seqlens, k, v, inv_freq, interleaved, causal=True, softmax_scale=None,
             rotate=ref.apply_rope):
    """(o, lse, k_cache after, v_cache after, q rotated) from the reference, one batch entry at a time.

    rotate(q, k, positions, inv_freq, interleaved) -> (q, k) rotated: reference.apply_rope, or
    kernel_rotation for bf16 (see there).
    """
    batch, sq = q.shape[:2]
    k_after, v_after, q_rot = k_cache.clone(), v_cache.clone(), q.clone()
    outs, lses = [], []
    for b in range(batch):
        start = int(cache_seqlens[b])
        if inv_freq is not None:
            positions = torch.arange(start, start + sq, device=q.device)
            q_b, k_b = rotate(q[b:b + 1], k[b:b + 1] if k is not None else q[b:b + 1], positions, inv_freq,
                              interleaved)
            q_rot[b] = q_b[0]
            if k is not None:
                k_after[b, start:start + sq] = k_b[0]
        elif k is not None:
            k_after[b, start:start + sq] = k[b]
        if v is not None:
            v_after[b, start:start + sq] = v[b]
        length = start + (sq if k is not None else 0)
        o, lse = ref.attention(q_rot[b:b + 1], k_after[b:b + 1, :length], v_after[b:b + 1, :length], causal,
                               softmax_scale, return_lse=True)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses), k_after, v_after, q_rot


def expected_o_lse(q, *args, rotation_backend="triton", **kwargs):
    """(o, lse) expected: over reference.apply_rope's rotation in fp32, the RoPE kernel's in bf16 (that of
    rotation_backend: the interpreter's Triton rounds toward zero, the C++ kernels to nearest)."""
    rotate = ref.apply_rope if q.dtype == F32 else functools.partial(kernel_rotation, backend=rotation_backend)
    return expected(q, *args, rotate=rotate, **kwargs)[:2]


def check_caches(k_cache, v_cache, k_before, v_before, want_k, want_v, cache_seqlens, sq, appended, rotated):
    """Appended rows equal the (rotated) new k and the new v; every other position is bit-identical."""
    touched = torch.zeros(k_cache.shape[:2], dtype=torch.bool, device=k_cache.device)
    if appended:
        for b, start in enumerate(cache_seqlens.tolist()):
            touched[b, start:start + sq] = True
            got_k, want_k_b = k_cache[b, start:start + sq], want_k[b, start:start + sq]
            if rotated:
                check_rotated(got_k, want_k_b)
            else:
                assert torch.equal(got_k, want_k_b), f"k_cache[{b}]: the appended keys are not the new k"
            assert torch.equal(v_cache[b, start:start + sq], want_v[b, start:start + sq]), \
                f"v_cache[{b}]: the appended values are not the new v"
    assert torch.equal(k_cache[~touched], k_before[~touched]), "k_cache changed outside the appended rows"
    assert torch.equal(v_cache[~touched], v_before[~touched]), "v_cache changed outside the appended rows"


def case_id(case):
    return case[0]


# --------------------------------------------------------------------------- against the reference
# (id, batch, S_max, Hq, Hk, head_dim, dtype, cache_seqlens, Sq, append, rope, num_splits, causal)
CASES = [
    ("decode-8/2-d64-fp32-half", 2, 64, 8, 2, 64, F32, [1, 40], 1, True, "theta", 0, True),
    # 143 + 1 = 144 keys, whole vectors of keys in every block (the C++ kernel reads the keys in place); 101 not.
    ("decode-whole-blocks-8/8-d128-fp32", 2, 160, 8, 8, 128, F32, [143, 100], 1, True, "theta", 0, True),
    ("decode-whole-blocks-8/8-d128-bf16", 2, 160, 8, 8, 128, BF16, [143, 100], 1, True, "theta", 0, True),
    ("empty-caches-append-8/8-d128-fp32-interleaved", 2, 16, 8, 8, 128, F32, [0, 0], 5, True, "theta-interleaved", 0,
     True),
    ("ragged-0-1-300-append-8/1-d128-bf16-half", 3, 320, 8, 1, 128, BF16, [0, 1, 300], 1, True, "theta", 0, True),
    # L = 0 (zeros, lse -inf), L = 1 with Sq = 5 (rows 0..3 see nothing), L = 300.
    ("ragged-0-1-300-no-append-8/2-d64-fp32", 3, 320, 8, 2, 64, F32, [0, 1, 300], 5, False, None, 3, True),
    ("sq5-append-no-rope-8/8-d64-bf16", 2, 48, 8, 8, 64, BF16, [7, 30], 5, True, None, 2, True),
    ("inv_freq-interleaved-8/2-d128-fp32-splits7", 1, 80, 8, 2, 128, F32, [70], 5, True, "inv_freq-interleaved", 7,
     True),
    ("full-8/1-d64-fp32", 2, 40, 8, 1, 64, F32, [3, 20], 5, True, "theta", 0, False),
    ("no-append-rope-on-q-8/2-d64-fp32", 2, 40, 8, 2, 64, F32, [10, 33], 5, False, "theta-interleaved", 1, True),
    ("cache-exactly-full-8/2-d128-bf16", 2, 24, 8, 2, 128, BF16, [19, 0], 5, True, "inv_freq", 0, True),
    # 17 queries x a group of 8 = 136 (query, head) rows: more than one block of rows (chunked prefill).
    ("sq17-8/1-d64-fp32", 1, 64, 8, 1, 64, F32, [30], 17, True, "theta", 2, True),
]


def run_case(case, backend, device):
    _, batch, s_max, hq, hk, d, dtype, seqlens, sq, append, rope, num_splits, causal = case
    q, k_cache, v_cache, cache_seqlens, k, v = make_inputs(batch, s_max, hq, hk, d, dtype, seqlens, sq, append, device)
    kwargs, inv_freq, interleaved = rope_kwargs(rope, d, device)
    _, _, want_k, want_v, _ = expected(q, k_cache, v_cache, cache_seqlens, k, v, inv_freq, interleaved, causal)
    want_o, want_lse = expected_o_lse(q, k_cache, v_cache, cache_seqlens, k, v, inv_freq, interleaved, causal,
                                      rotation_backend="native" if backend == "native" else "triton")
    q_before, k_before, v_before, seqlens_before = q.clone(), k_cache.clone(), v_cache.clone(), cache_seqlens.clone()
    o, lse = lk.flash_attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, k=k, v=v, causal=causal,
                                             num_splits=num_splits, return_lse=True, backend=backend, **kwargs)
    assert o.shape == q.shape and lse.shape == (batch, hq, sq)
    check_attention_out(o, want_o)
    check_lse(lse, want_lse)
    check_caches(k_cache, v_cache, k_before, v_before, want_k, want_v, cache_seqlens, sq, append, rope is not None)
    assert torch.equal(cache_seqlens, seqlens_before), "cache_seqlens was modified"
    assert torch.equal(q, q_before), "q was modified"
    return o, lse


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_reference(device, case, backend):
    run_case(case, backend, device)


@pytest.mark.parametrize("case", [CASES[0], CASES[3]], ids=case_id)
def test_reference_backend_matches_reference(device, case):
    run_case(case, "reference", device)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_entries_give_zeros(device, backend, dtype):
    """Entries whose attended length is 0 (empty cache, no append) are zeros with lse -inf, never NaN,
    next to an entry that attends normally."""
    q, k_cache, v_cache, cache_seqlens, _, _ = make_inputs(3, 32, 8, 2, 64, dtype, [0, 9, 0], 5, False, device)
    o, lse = lk.flash_attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, return_lse=True, backend=backend)
    assert not o.isnan().any() and not lse.isnan().any()
    assert (o[[0, 2]] == 0).all() and lse[[0, 2]].isneginf().all()
    assert lse[1].isfinite().all()  # L = 9 >= Sq: every query sees a key
    want_o, want_lse, *_ = expected(q, k_cache, v_cache, cache_seqlens, None, None, None, False)
    check_attention_out(o, want_o)
    check_lse(lse, want_lse)


def test_return_lse_false_default_backend_and_softmax_scale(device):
    """return_lse=False gives o alone; the default backend (Triton on CUDA and under the interpreter) matches;
    softmax_scale."""
    q, k_cache, v_cache, cache_seqlens, k, v = make_inputs(2, 40, 4, 2, 64, F32, [5, 17], 1, True, device)
    want_o, _, want_k, want_v, _ = expected(q, k_cache, v_cache, cache_seqlens, k, v,
                                            rope_inv_freq(64, 1e6, device=device), False, softmax_scale=0.3)
    kc, vc = k_cache.clone(), v_cache.clone()
    o = lk.flash_attention_with_kvcache(q, kc, vc, cache_seqlens, k=k, v=v, rope_theta=1e6, softmax_scale=0.3)
    assert isinstance(o, torch.Tensor)
    check_attention_out(o, want_o)
    check_caches(kc, vc, k_cache, v_cache, want_k, want_v, cache_seqlens, 1, True, True)
    kc2, vc2 = k_cache.clone(), v_cache.clone()
    o2 = lk.flash_attention_with_kvcache(q, kc2, vc2, cache_seqlens, k=k, v=v, rope_theta=1e6, softmax_scale=0.3,
                                         backend="triton")
    assert torch.equal(o, o2) and torch.equal(kc, kc2) and torch.equal(vc, vc2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_caches_and_inputs(device, backend):
    """Caches that are views of one interleaved (B, S_max, 2, Hk, D) buffer, q seen through a transpose."""
    kv = randn(2, 64, 2, 2, 64, device=device)
    k_cache, v_cache = kv[:, :, 0], kv[:, :, 1]
    q = randn(2, 8, 5, 64, device=device).transpose(1, 2)  # (2, 5, 8, 64)
    k, v = randn(2, 5, 2, 64, device=device), randn(2, 5, 2, 64, device=device)
    cache_seqlens = torch.tensor([11, 50], dtype=I32, device=device)
    want_o, want_lse, want_k, want_v, _ = expected(q, k_cache, v_cache, cache_seqlens, k, v,
                                                   rope_inv_freq(64, 1e4, device=device), False)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    o, lse = lk.flash_attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, k=k, v=v, rope_theta=1e4,
                                             return_lse=True, backend=backend)
    check_attention_out(o, want_o)
    check_lse(lse, want_lse)
    check_caches(k_cache, v_cache, k_before, v_before, want_k, want_v, cache_seqlens, 5, True, True)


# --------------------------------------------------------------------------- num_splits
def test_num_splits_agree(device):
    """Automatic and explicit splits of the keys give the same o and lse (fp32: 1e-5) and the same caches."""
    q, k_cache, v_cache, cache_seqlens, k, v = make_inputs(2, 200, 8, 2, 64, F32, [150, 37], 5, True, device)
    inv_freq = rope_inv_freq(64, 1e4, device=device)
    want_o, want_lse, want_k, want_v, _ = expected(q, k_cache, v_cache, cache_seqlens, k, v, inv_freq, False)
    results = {}
    for num_splits in (0, 1, 2, 3, 7):
        kc, vc = k_cache.clone(), v_cache.clone()
        o, lse = lk.flash_attention_with_kvcache(q, kc, vc, cache_seqlens, k=k, v=v, rope_theta=1e4,
                                                 num_splits=num_splits, return_lse=True, backend="triton")
        check_attention_out(o, want_o)
        check_lse(lse, want_lse)
        check_caches(kc, vc, k_cache, v_cache, want_k, want_v, cache_seqlens, 5, True, True)
        results[num_splits] = (o, lse, kc, vc)
    o0, lse0, kc0, vc0 = results[0]
    for num_splits, (o, lse, kc, vc) in results.items():
        torch.testing.assert_close(o, o0, rtol=1e-5, atol=1e-5, msg=lambda m: f"num_splits={num_splits}: {m}")
        torch.testing.assert_close(lse, lse0, rtol=1e-5, atol=1e-5, msg=lambda m: f"num_splits={num_splits}: {m}")
        assert torch.equal(kc, kc0) and torch.equal(vc, vc0), f"num_splits={num_splits}: different caches"


@pytest.mark.parametrize("backend", extension_backends("flash_attention_with_kvcache", "cpu"))
def test_native_result_does_not_depend_on_thread_count(backend):
    """The C++ kernel splits a long cache into chunks across threads: the same bits on 1, 2 and 3 threads."""
    q, k_cache, v_cache, cache_seqlens, _, _ = make_inputs(2, 1100, 8, 2, 128, BF16, [1100, 300], 1, False, "cpu")
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(lk.flash_attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, return_lse=True,
                                                           backend=backend))
    finally:
        torch.set_num_threads(threads)
    want_o, want_lse, *_ = expected(q, k_cache, v_cache, cache_seqlens, None, None, None, False)
    check_attention_out(results[0][0], want_o)
    check_lse(results[0][1], want_lse)
    for n, (o, lse) in zip((2, 3), results[1:]):
        assert torch.equal(o, results[0][0]) and torch.equal(lse, results[0][1]), f"{n} threads differ from 1"


# --------------------------------------------------------------------------- against flash_attention
@pytest.mark.parametrize("sq,interleaved", [(1, False), (5, True)], ids=["sq1-half", "sq5-interleaved"])
def test_lse_merges_with_flash_attention(device, sq, interleaved):
    """With equal cache lengths the call is flash_attention over the filled cache (bottom-right causal)."""
    q, k_cache, v_cache, cache_seqlens, k, v = make_inputs(2, 72, 8, 2, 128, F32, [60, 60], sq, True, device)
    _, _, _, _, q_rot = expected(q, k_cache, v_cache, cache_seqlens, k, v, rope_inv_freq(128, 1e4, device=device),
                                 interleaved)
    o, lse = lk.flash_attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, k=k, v=v, rope_theta=1e4,
                                             interleaved=interleaved, return_lse=True, backend="triton")
    length = 60 + sq
    want_o, want_lse = lk.flash_attention(q_rot, k_cache[:, :length], v_cache[:, :length], causal=True,
                                          return_lse=True, backend="triton")
    check_attention_out(o, want_o)
    check_lse(lse, want_lse)


# --------------------------------------------------------------------------- refusals
def _call(**overrides):
    """Valid arguments (B 2, S_max 8, Hq 4, Hk 2, D 64, cache_seqlens [4, 5], Sq 3 with an append) with overrides."""
    args = {
        "q": randn(2, 3, 4, 64), "k_cache": randn(2, 8, 2, 64), "v_cache": randn(2, 8, 2, 64),
        "cache_seqlens": torch.tensor([4, 5], dtype=I32), "k": randn(2, 3, 2, 64), "v": randn(2, 3, 2, 64),
        "rope_theta": 1e4, "backend": "triton",
    }
    return {**args, **overrides}


@pytest.mark.parametrize(
    "make_kwargs,error,match",
    [
        (lambda: _call(), None, None),  # the baseline is accepted
        # entry 0 fits (4 + 3 <= 8), entry 1 does not (6 + 3 > 8): nothing may be written to either.
        (lambda: _call(cache_seqlens=torch.tensor([4, 6], dtype=I32)), ValueError,
         r"^(k_cache|cache_seqlens): expected"),
        (lambda: _call(cache_seqlens=torch.tensor([4, 5])), TypeError, r"^cache_seqlens: expected"),
        (lambda: _call(cache_seqlens=torch.tensor([4, 5, 1], dtype=I32)), ValueError, r"^cache_seqlens: expected"),
        (lambda: _call(cache_seqlens=torch.tensor([4, 9], dtype=I32), k=None, v=None), ValueError,
         r"^(k_cache|cache_seqlens): expected"),  # past S_max without an append
        (lambda: _call(cache_seqlens=torch.tensor([4, -1], dtype=I32)), ValueError, r"^cache_seqlens: expected"),
        (lambda: _call(k_cache=randn(2, 8, 3, 64), v_cache=randn(2, 8, 3, 64), k=None, v=None), ValueError,
         r"^k_cache: expected"),  # 4 % 3 heads
        (lambda: _call(v=None), ValueError, r"\bv\b"),
        (lambda: _call(k=None), ValueError, r"\bk\b"),
        (lambda: _call(k=randn(2, 3, 1, 64)), ValueError, r"^k: expected"),  # heads
        (lambda: _call(k=randn(2, 3, 2, 128)), ValueError, r"^k: expected"),  # head_dim
        (lambda: _call(k=randn(1, 3, 2, 64)), ValueError, r"^k: expected"),  # batch
        (lambda: _call(q=randn(2, 3, 4, 96), k_cache=randn(2, 8, 2, 96), v_cache=randn(2, 8, 2, 96),
                       k=randn(2, 3, 2, 96), v=randn(2, 3, 2, 96)), ValueError, r"head_dim"),
        (lambda: _call(num_splits=-1), ValueError, r"^num_splits"),
    ],
    ids=["ok", "cache-too-short", "seqlens-int64", "seqlens-shape", "seqlens-past-S_max", "seqlens-negative",
         "heads-not-multiple", "k-without-v", "v-without-k", "k-heads", "k-head_dim", "k-batch", "head_dim-96",
         "num_splits-negative"],
)
def test_bad_input_is_refused_before_any_write(make_kwargs, error, match):
    kwargs = make_kwargs()
    k_before, v_before = kwargs["k_cache"].clone(), kwargs["v_cache"].clone()
    seqlens_before = kwargs["cache_seqlens"].clone()
    if error is None:
        assert lk.flash_attention_with_kvcache(**kwargs).shape == kwargs["q"].shape
        assert not torch.equal(kwargs["k_cache"], k_before)  # the baseline does append
        return
    with pytest.raises(error, match=match):
        lk.flash_attention_with_kvcache(**kwargs)
    assert torch.equal(kwargs["k_cache"], k_before), "k_cache was written before the refusal"
    assert torch.equal(kwargs["v_cache"], v_before), "v_cache was written before the refusal"
    assert torch.equal(kwargs["cache_seqlens"], seqlens_before)


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # the merge kernel meets the NaN rows
@pytest.mark.parametrize("rope", [False, True], ids=["copy", "rope"])
@pytest.mark.parametrize("append", [True, False], ids=["append", "no-append"])
def test_kernels_guard_lengths_the_cache_cannot_hold(device, append, rope):
    """On a GPU the wrapper does not read cache_seqlens (a host sync per step): the kernels must write nothing
    outside the caches and give NaN for the sequences whose length does not fit, and the right answer for the
    others. Called through the torch op, which skips the wrapper's host-side check."""
    seqlens = [4, 6, -2, 3] if append else [4, 9, -1, 8]  # entries 1 and 2 do not fit (S_max 8, Sq 3)
    q, k_cache, v_cache, cache_seqlens, k, v = make_inputs(4, 8, 4, 2, 64, F32, seqlens, 3, append, device)
    inv_freq = rope_inv_freq(64, 1e4, device=device) if rope else None
    # The cache rows before and after, with a border to catch a write past either end of a sequence's rows.
    k_big, v_big = randn(6, 8, 2, 64, device=device), randn(6, 8, 2, 64, device=device)
    k_before, v_before = k_big.clone(), v_big.clone()
    kc, vc = k_big[1:5], v_big[1:5]
    kc.copy_(k_cache), vc.copy_(v_cache)
    o, lse = torch.ops.llama_kernels.flash_attention_with_kvcache(
        q, kc, vc, cache_seqlens, k, v, inv_freq, False, True, 64**-0.5, 0, "triton")
    good, bad = [0, 3], [1, 2]
    assert o[bad].isnan().all() and lse[bad].isnan().all()
    assert torch.equal(k_big[[0, 5]], k_before[[0, 5]]) and torch.equal(v_big[[0, 5]], v_before[[0, 5]])
    if append:  # the bad entries may have written their in-range slots (1: 6 and 7 of 6..8; 2: 0 of -2..0), no other
        assert torch.equal(kc[1, :6], k_cache[1, :6]) and torch.equal(kc[2, 1:], k_cache[2, 1:])
        assert torch.equal(vc[1, :6], v_cache[1, :6]) and torch.equal(vc[2, 1:], v_cache[2, 1:])
    else:
        assert torch.equal(kc[bad], k_cache[bad]) and torch.equal(vc[bad], v_cache[bad])
    good_seqlens = cache_seqlens[good]
    want_o, want_lse, want_k, want_v, _ = expected(q[good], k_cache[good], v_cache[good], good_seqlens,
                                                   k[good] if append else None, v[good] if append else None,
                                                   inv_freq, False)
    check_attention_out(o[good], want_o)
    check_lse(lse[good], want_lse)
    check_caches(kc[good], vc[good], k_cache[good], v_cache[good], want_k, want_v, good_seqlens, 3, append, rope)


# --------------------------------------------------------------------------- torch.compile
def test_fullgraph_compile_appends_and_matches_eager(device):
    """The op declares that it mutates the caches: compiled and eager give the same o and the same caches."""
    torch._dynamo.reset()
    q, k_cache, v_cache, cache_seqlens, k, v = make_inputs(2, 48, 8, 2, 64, F32, [9, 30], 5, True, device)

    def f(q, k_cache, v_cache, cache_seqlens, k, v):
        o = lk.flash_attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, k=k, v=v, rope_theta=1e4,
                                           interleaved=True, backend="triton")
        return o * 2

    def run(fn):
        kc, vc = k_cache.clone(), v_cache.clone()
        return fn(q, kc, vc, cache_seqlens, k, v), kc, vc

    (o_c, kc_c, vc_c), (o_e, kc_e, vc_e) = run(torch.compile(f, backend="aot_eager", fullgraph=True)), run(f)
    torch.testing.assert_close(o_c, o_e, rtol=1e-5, atol=1e-5)
    assert torch.equal(kc_c, kc_e) and torch.equal(vc_c, vc_e), "compiled and eager caches differ"
    want_o, _, want_k, want_v, _ = expected(q, k_cache, v_cache, cache_seqlens, k, v,
                                            rope_inv_freq(64, 1e4, device=device), True)
    check_attention_out(o_c / 2, want_o)
    check_caches(kc_c, vc_c, k_cache, v_cache, want_k, want_v, cache_seqlens, 5, True, True)


# --------------------------------------------------------------------------- the op's registration
@pytest.mark.parametrize("backend", [*BACKENDS, "reference"])
def test_op_declares_what_it_writes(device, backend):
    """torch.library.opcheck (the schema's mutations against what the op writes, the fake implementation, the
    compiled path) on an appending call with RoPE; and an append bumps both caches' version counters, which the
    op does itself (a kernel's writes are invisible to torch)."""
    q, k_cache, v_cache, cache_seqlens, k, v = make_inputs(2, 24, 4, 2, 64, F32, [3, 11], 2, True, device)
    inv_freq = rope_inv_freq(64, 1e4, device=device)
    op = torch.ops.llama_kernels.flash_attention_with_kvcache
    args = (q, k_cache, v_cache, cache_seqlens, k, v, inv_freq, False, True, 64**-0.5, 0, backend)
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    versions = k_cache._version, v_cache._version
    op(*args)
    assert k_cache._version > versions[0] and v_cache._version > versions[1]


# --------------------------------------------------------------------------- property
@settings(max_examples=10, deadline=None, derandomize=True)
@given(data=st.data(), batch=st.integers(1, 2), s_max=st.integers(1, 140), sq=st.sampled_from([1, 5]),
       append=st.booleans(), n_kv=st.integers(1, 2), group=st.sampled_from([1, 4]),
       head_dim=st.sampled_from([64, 128]), rope=st.sampled_from([None, "theta", "theta-interleaved"]),
       num_splits=st.sampled_from([0, 1, 3]), dtype=st.sampled_from([F32, BF16]))
def test_any_shape(device, data, batch, s_max, sq, append, n_kv, group, head_dim, rope, num_splits, dtype):
    s_max = max(s_max, sq) if append else s_max
    top = s_max - sq if append else s_max
    seqlens = data.draw(st.lists(st.integers(0, top), min_size=batch, max_size=batch), label="cache_seqlens")
    case = ("any", batch, s_max, n_kv * group, n_kv, head_dim, dtype, seqlens, sq, append, rope, num_splits, True)
    run_case(case, "triton", device)
