"""Checkpoint loading: Meta's sharded .pth files and Hugging Face's safetensors / .bin files.

The checkpoints are written here, by hand, the way Meta's model-parallel code and the
Hugging Face conversion script lay them out, from one tiny random model.
"""

import json

import pytest
import torch
from safetensors.torch import save_file

import llama_kernels as lk
from llama_kernels import reference
from llama_kernels.models.checkpoint import load_checkpoint
from llama_kernels.models.config import CodeLlamaConfig

PARAMS = {"dim": 256, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 300, "multiple_of": 32,
          "norm_eps": 1e-5, "rope_theta": 1e6}
HIDDEN = 704  # Meta's rule: 2/3 * 4 * 256 = 682, rounded up to a multiple of 32
HEAD_DIM = 64

# How Meta's fairscale layers split each parameter across ranks (None: replicated), written out
# here independently of the loader's table.
SPLIT = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1,
         "attention_norm": None, "ffn_norm": None, "norm": None}

HF_NAMES = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
            "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
            "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj", "feed_forward.w3": "mlp.up_proj",
            "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


@pytest.fixture
def config():
    return CodeLlamaConfig.from_meta_params(PARAMS)


@pytest.fixture
def meta_state(config):
    """A random state dict under Meta's names, with the shapes written out by hand."""
    dim, vocab, q, kv = 256, 300, 4 * HEAD_DIM, 2 * HEAD_DIM
    assert config.hidden_dim == HIDDEN and config.head_dim == HEAD_DIM
    state = {"tok_embeddings.weight": torch.randn(vocab, dim)}
    for i in range(2):
        state.update({
            f"layers.{i}.attention.wq.weight": torch.randn(q, dim),
            f"layers.{i}.attention.wk.weight": torch.randn(kv, dim),
            f"layers.{i}.attention.wv.weight": torch.randn(kv, dim),
            f"layers.{i}.attention.wo.weight": torch.randn(dim, q),
            f"layers.{i}.feed_forward.w1.weight": torch.randn(HIDDEN, dim),
            f"layers.{i}.feed_forward.w2.weight": torch.randn(dim, HIDDEN),
            f"layers.{i}.feed_forward.w3.weight": torch.randn(HIDDEN, dim),
            f"layers.{i}.attention_norm.weight": torch.rand(dim) + 0.5,
            f"layers.{i}.ffn_norm.weight": torch.rand(dim) + 0.5,
        })
    state["norm.weight"] = torch.rand(dim) + 0.5
    state["output.weight"] = torch.randn(vocab, dim)
    return state


# --------------------------------------------------------------------------- writing checkpoints
def write_meta(directory, state, n_shards=2, params=PARAMS):
    """Meta's layout: params.json and one consolidated.NN.pth per model-parallel rank."""
    directory.mkdir(exist_ok=True)
    shards = [{"rope.freqs": torch.randn(HEAD_DIM // 2)} for _ in range(n_shards)]
    for name, tensor in state.items():
        dim = SPLIT[name.split(".")[-2]]
        parts = [tensor] * n_shards if dim is None else tensor.chunk(n_shards, dim)
        for shard, part in zip(shards, parts):
            shard[name] = part.clone()  # a view would save the whole tensor's storage
    for rank, shard in enumerate(shards):
        torch.save(shard, directory / f"consolidated.{rank:02d}.pth")
    (directory / "params.json").write_text(json.dumps(params))
    return directory


def permute_for_hf(w, n_heads):
    """The Hugging Face conversion script's permutation of wq / wk rows (per head)."""
    rows, dim = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, dim).transpose(1, 2).reshape(rows, dim)


def hf_permuted(state):
    """Meta's state dict with wq and wk permuted as the Hugging Face conversion does (Meta's names)."""
    out = dict(state)
    for i in range(2):
        out[f"layers.{i}.attention.wq.weight"] = permute_for_hf(state[f"layers.{i}.attention.wq.weight"], 4)
        out[f"layers.{i}.attention.wk.weight"] = permute_for_hf(state[f"layers.{i}.attention.wk.weight"], 2)
    return out


def to_hf_names(state):
    out = {}
    for name, tensor in state.items():
        parts = name.split(".")
        if parts[0] == "layers":
            hf = f"model.layers.{parts[1]}.{HF_NAMES['.'.join(parts[2:-1])]}.weight"
        else:
            hf = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                  "output.weight": "lm_head.weight"}[name]
        out[hf] = tensor.contiguous()
    return out


def hf_config(**changes):
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
            "intermediate_size": HIDDEN, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": 300, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
            "max_position_embeddings": 16384, "tie_word_embeddings": False, "torch_dtype": "float32", **changes}


def write_hf(directory, hf_state, kind="safetensors", **config_changes):
    """Hugging Face's layout: config.json and one of model.safetensors, sharded safetensors
    with model.safetensors.index.json, pytorch_model.bin, or sharded .bin with its index."""
    directory.mkdir(exist_ok=True)
    (directory / "config.json").write_text(json.dumps(hf_config(**config_changes)))
    if kind == "safetensors":
        save_file(hf_state, directory / "model.safetensors", metadata={"format": "pt"})
    elif kind == "bin":
        torch.save(hf_state, directory / "pytorch_model.bin")
    else:  # sharded: layer 0 and the embedding in one file, the rest in the other
        ext, stem = {"sharded-safetensors": ("safetensors", "model"), "sharded-bin": ("bin", "pytorch_model")}[kind]
        files = [f"{stem}-00001-of-00002.{ext}", f"{stem}-00002-of-00002.{ext}"]
        weight_map = {name: files[0] if ("layers.0." in name or "embed" in name) else files[1] for name in hf_state}
        for file in files:
            part = {name: t for name, t in hf_state.items() if weight_map[name] == file}
            if ext == "safetensors":
                save_file(part, directory / file, metadata={"format": "pt"})
            else:
                torch.save(part, directory / file)
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in hf_state.values())},
                 "weight_map": weight_map}
        (directory / f"{stem}.{ext}.index.json").write_text(json.dumps(index))
    return directory


def assert_state_equal(got, want, dtype=None):
    assert list(got) == list(want)
    for name in want:
        expected = want[name] if dtype is None else want[name].to(dtype)
        assert got[name].dtype == expected.dtype, name
        assert torch.equal(got[name], expected), name


# --------------------------------------------------------------------------- loading
@pytest.mark.parametrize("n_shards", [1, 2])
def test_meta_sharded_merges_to_the_original(tmp_path, meta_state, config, n_shards):
    ckpt = load_checkpoint(write_meta(tmp_path / "meta", meta_state, n_shards))
    assert ckpt.format == "meta" and ckpt.interleaved is True
    assert ckpt.config == config
    assert_state_equal(ckpt.state_dict, meta_state)  # rope.freqs dropped, every shard merged


@pytest.mark.parametrize("kind", ["safetensors", "sharded-safetensors", "bin", "sharded-bin"])
def test_hf_loads_under_meta_names_without_unpermuting(tmp_path, meta_state, kind):
    permuted = hf_permuted(meta_state)
    hf_state = to_hf_names(permuted)
    hf_state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.randn(HEAD_DIM // 2)  # old files' buffer
    ckpt = load_checkpoint(write_hf(tmp_path / "hf", hf_state, kind))
    assert ckpt.format == "hf" and ckpt.interleaved is False
    c = ckpt.config
    assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size, c.hidden_dim, c.norm_eps, c.rope_theta) == \
        (256, 2, 4, 2, 300, HIDDEN, 1e-5, 1e6)
    assert_state_equal(ckpt.state_dict, permuted)


def test_hf_tied_embeddings(tmp_path, meta_state):
    hf_state = to_hf_names(hf_permuted(meta_state))
    del hf_state["lm_head.weight"]
    ckpt = load_checkpoint(write_hf(tmp_path / "hf", hf_state, tie_word_embeddings=True))
    assert torch.equal(ckpt.state_dict["output.weight"], meta_state["tok_embeddings.weight"])
    # without tie_word_embeddings the missing lm_head is an error
    write_hf(tmp_path / "untied", hf_state)
    with pytest.raises(ValueError, match=r"missing 1 name: output\.weight"):
        load_checkpoint(tmp_path / "untied")


def test_meta_vocab_size_minus_one_is_read_off_the_embedding(tmp_path, meta_state, config):
    ckpt = load_checkpoint(write_meta(tmp_path / "meta", meta_state, 2, params={**PARAMS, "vocab_size": -1}))
    assert ckpt.config.vocab_size == 300 and ckpt.config == config


@pytest.mark.parametrize("fmt", ["meta", "hf"])
def test_dtype_conversion(tmp_path, meta_state, fmt):
    if fmt == "meta":
        path, want = write_meta(tmp_path / "m", meta_state, 2), meta_state
    else:
        want = hf_permuted(meta_state)
        path = write_hf(tmp_path / "h", to_hf_names(want), "sharded-safetensors")
    ckpt = load_checkpoint(path, dtype=torch.bfloat16)
    assert_state_equal(ckpt.state_dict, want, dtype=torch.bfloat16)


# --------------------------------------------------------------------------- the two layouts are one model
def test_hf_permutation_with_half_split_rope_is_meta_with_interleaved_rope():
    """HF's permuted wq/wk under half-split RoPE give Meta's wq/wk under interleaved RoPE, up to
    the per-head permutation of the head_dim coordinates, and hence the same scores q.k."""
    B, S, dim, H, Hk, D = 2, 24, 256, 4, 2, HEAD_DIM
    x = torch.randn(B, S, dim, dtype=torch.float64)
    wq, wk = torch.randn(H * D, dim, dtype=torch.float64), torch.randn(Hk * D, dim, dtype=torch.float64)
    inv_freq = lk.rope_inv_freq(D, 1e6, dtype=torch.float64)  # float64 angles: both paths exact to rounding
    positions = torch.arange(S)

    def project(w, heads):
        return (x @ w.T).view(B, S, heads, D)

    q_meta, k_meta = reference.apply_rope(project(wq, H), project(wk, Hk), positions, inv_freq, interleaved=True)
    q_hf, k_hf = reference.apply_rope(project(permute_for_hf(wq, H), H), project(permute_for_hf(wk, Hk), Hk),
                                      positions, inv_freq, interleaved=False)

    # HF coordinate c * D/2 + i holds Meta's coordinate 2i + c
    perm = torch.arange(D).view(D // 2, 2).T.reshape(-1)
    torch.testing.assert_close(q_hf, q_meta[..., perm], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(k_hf, k_meta[..., perm], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(q_hf, q_meta)  # the layouts do differ coordinate-wise

    def scores(q, k):  # (B, H, S, S), each query head against its GQA key head
        return torch.einsum("bshd,bthd->bhst", q, k.repeat_interleave(H // Hk, dim=2))

    torch.testing.assert_close(scores(q_hf, k_hf), scores(q_meta, k_meta), rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------- errors
def test_shape_mismatch_names_the_key(tmp_path, meta_state):
    hf_state = to_hf_names(hf_permuted(meta_state))
    hf_state["model.layers.1.mlp.down_proj.weight"] = hf_state["model.layers.1.mlp.down_proj.weight"][:, :640].clone()
    with pytest.raises(ValueError, match=r"layers\.1\.feed_forward\.w2\.weight: expected shape \(256, 704\) "
                                         r"from the config, got \(256, 640\)"):
        load_checkpoint(write_hf(tmp_path / "hf", hf_state))


def test_meta_shape_mismatch_after_merge_names_the_key(tmp_path, meta_state):
    # params.json says 4 key/value heads; the weights hold 2
    write_meta(tmp_path / "meta", meta_state, 2, params={**PARAMS, "n_kv_heads": 4})
    with pytest.raises(ValueError, match=r"layers\.0\.attention\.wk\.weight: expected shape \(256, 256\) "
                                         r"from the config, got \(128, 256\)"):
        load_checkpoint(tmp_path / "meta")


def test_missing_hf_shard(tmp_path, meta_state):
    path = write_hf(tmp_path / "hf", to_hf_names(meta_state), "sharded-safetensors")
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model-00002-of-00002\.safetensors: missing shard"):
        load_checkpoint(path)


def test_missing_meta_shard(tmp_path, meta_state):
    gap = write_meta(tmp_path / "gap", meta_state, 4)
    (gap / "consolidated.01.pth").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing shard\(s\) \[1\]"):
        load_checkpoint(gap)
    last = write_meta(tmp_path / "last", meta_state, 2)
    (last / "consolidated.01.pth").unlink()  # no gap, but the slices' widths imply two shards
    with pytest.raises(ValueError, match=r"implies 2 shards; found 1"):
        load_checkpoint(last)


def test_meta_shards_must_hold_the_same_names(tmp_path, meta_state):
    path = write_meta(tmp_path / "meta", meta_state, 2)
    shard = torch.load(path / "consolidated.01.pth")
    del shard["layers.1.ffn_norm.weight"]
    torch.save(shard, path / "consolidated.01.pth")
    with pytest.raises(ValueError, match=r"consolidated\.01\.pth.*missing 1 name: layers\.1\.ffn_norm\.weight"):
        load_checkpoint(path)


def test_not_a_checkpoint_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a checkpoint directory"):
        load_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        load_checkpoint(tmp_path / "absent")
    (tmp_path / "config.json").write_text(json.dumps(hf_config()))  # a config without weights
    with pytest.raises(ValueError, match="not a checkpoint directory"):
        load_checkpoint(tmp_path)


def test_missing_and_unexpected_keys(tmp_path, meta_state):
    hf_state = to_hf_names(meta_state)
    del hf_state["model.layers.0.post_attention_layernorm.weight"]
    hf_state["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(256)
    with pytest.raises(ValueError, match=r"missing 1 name: layers\.0\.ffn_norm\.weight; "
                                         r"unexpected 1 name: model\.layers\.0\.self_attn\.q_proj\.bias"):
        load_checkpoint(write_hf(tmp_path / "hf", hf_state))

    meta = dict(meta_state)
    del meta["norm.weight"]
    with pytest.raises(ValueError, match=r"missing 1 name: norm\.weight"):
        load_checkpoint(write_meta(tmp_path / "meta", meta, 2))


def test_a_directory_of_both_formats_needs_format(tmp_path, meta_state):
    path = write_meta(tmp_path / "both", meta_state, 2)
    write_hf(path, to_hf_names(hf_permuted(meta_state)))
    with pytest.raises(ValueError, match="holds both"):
        load_checkpoint(path)
    assert load_checkpoint(path, format="meta").interleaved is True
    assert load_checkpoint(path, format="hf").interleaved is False
