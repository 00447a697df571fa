"""Loading Code Llama's weights from Meta's or Hugging Face's checkpoint directories.

Both formats are read into one state dict with **Meta's parameter names** (those of
``CodeLlama``; ``expected_shapes`` lists them with their shapes).

Meta's format (``params.json`` + ``consolidated.00.pth``, ``consolidated.01.pth``, ...)
    One ``.pth`` file per model-parallel rank. Each holds every parameter name with
    that rank's slice, split the way Meta's fairscale layers split them:
    ColumnParallelLinear (wq, wk, wv, w1, w3, output) along dim 0, RowParallelLinear
    (wo, w2) along dim 1, ParallelEmbedding (tok_embeddings) along dim 1; the norms
    are replicated. The shards are merged by concatenation along those dims. The
    ``rope.freqs`` buffer is dropped. params.json's ``vocab_size`` of -1 (Llama 2's
    files) is read off ``tok_embeddings.weight``.

Hugging Face's format (``config.json`` + ``model.safetensors``, or shards named by
``model.safetensors.index.json``, or ``pytorch_model.bin`` / shards named by
``pytorch_model.bin.index.json``)
    transformers' names are mapped to Meta's (``HF_TO_META``, ``HF_LAYER_TO_META``); ``lm_head`` missing
    with ``tie_word_embeddings`` gives ``output.weight = tok_embeddings.weight`` (the
    same tensor); ``rotary_emb.inv_freq`` buffers are dropped.

RoPE layout. Meta's RoPE rotates the pairs (x[2i], x[2i+1]) ("interleaved"). The
Hugging Face conversion script permutes the rows of wq and wk within each head,
``w.view(n_heads, head_dim // 2, 2, dim).transpose(1, 2).reshape(n_heads * head_dim, dim)``,
so that transformers' half-split RoPE, on the pairs (x[i], x[i + head_dim/2]), computes
the same attention scores. These weights are **not** un-permuted here: the layout is
reported (``Checkpoint.interleaved``: True for Meta's files, False for Hugging Face's)
and the model runs RoPE in that layout. Then no permutation can be applied wrongly or
twice, and the weights are the checkpoint's bit for bit.

Memory. No second copy of the weights is made: ``.pth``/``.bin`` files are opened with
``torch.load(mmap=True, weights_only=True)`` and ``.safetensors`` files with
``safe_open``, every name and shape is checked against the config before any tensor is
read, and then the tensors are read, converted to ``dtype`` and moved to ``device`` one
at a time. A merged Meta tensor is written into its final buffer shard by shard. Every
tensor returned owns its memory: none stays backed by a mapped file (which could then
change or be truncated under it), so the files' pages are only page cache, read once.
"""

from __future__ import annotations

import json
import re
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .._checks import FLOAT_DTYPES
from .config import CodeLlamaConfig, read_json_object

__all__ = ["Checkpoint", "load_checkpoint", "detect_format", "expected_shapes", "hf_to_meta_name",
           "meta_split_dim"]

META_PARAMS = "params.json"
META_SHARD_GLOB = "consolidated.*.pth"
_META_SHARD_RE = re.compile(r"consolidated\.(\d+)\.pth")
META_DROPPED = {"rope.freqs"}

# The stored dtypes a checkpoint's weights may have (converted on loading); safetensors' names for them.
CHECKPOINT_DTYPES = (*FLOAT_DTYPES, torch.float64)
_SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}

HF_CONFIG = "config.json"
# (single file, index of shards), in order of preference
HF_WEIGHT_FILES = [("model.safetensors", "model.safetensors.index.json"),
                   ("pytorch_model.bin", "pytorch_model.bin.index.json")]

# How Meta's model-parallel layers split each parameter (by the name's last two parts); None: replicated.
META_SPLIT_DIMS = {
    "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0,  # ColumnParallelLinear
    "wo": 1, "w2": 1,  # RowParallelLinear
    "tok_embeddings": 1,  # ParallelEmbedding
    "attention_norm": None, "ffn_norm": None, "norm": None,  # RMSNorm, on every rank
}

# transformers' names (less ".weight") to Meta's: the model's own, then each layer's (under model.layers.{i}.)
HF_TO_META = {"model.embed_tokens": "tok_embeddings", "model.norm": "norm", "lm_head": "output"}
HF_LAYER_TO_META = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
_HF_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight")
_HF_DROPPED_RE = re.compile(r"(model\.)?layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


@dataclass
class Checkpoint:
    """A loaded checkpoint: its config, its weights under Meta's names, and its RoPE layout.

    interleaved: True for Meta's weights (RoPE on pairs (x[2i], x[2i+1])), False for
        Hugging Face's (wq and wk permuted for pairs (x[i], x[i + head_dim/2])).
    format: "meta" or "hf".
    """

    config: CodeLlamaConfig
    state_dict: dict[str, Tensor]
    interleaved: bool
    format: str


def load_checkpoint(path, *, dtype: torch.dtype | None = None, device="cpu", format: str | None = None) -> Checkpoint:
    """Load a Meta or Hugging Face checkpoint directory (see the module docstring).

    dtype: the weights' dtype (float16, bfloat16 or float32); None keeps the checkpoint's own, which must
        then be one of those, the same for every weight.
    device: where the weights go, one tensor at a time.
    format: "meta" or "hf"; None detects it (``detect_format``), which refuses a
        directory holding both.
    Raises FileNotFoundError for a missing directory or shard, ValueError for a
    directory of neither format, missing or unexpected names, or a shape that does not
    match the config, or weights that are not floating point (or of mixed dtypes with dtype=None);
    TypeError for another dtype.
    """
    check_dtype(dtype)
    path = Path(path)
    format = format or detect_format(path)
    if format == "meta":
        return _load_meta(path, dtype, device)
    if format == "hf":
        return _load_hf(path, dtype, device)
    raise ValueError(f"format: expected 'meta', 'hf' or None, got {format!r}")


# --------------------------------------------------------------------------- format detection
def detect_format(path: Path) -> str:
    """"meta" for params.json + consolidated.*.pth, "hf" for config.json + weights; else ValueError."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint directory")
    if not path.is_dir():
        raise ValueError(f"{path}: expected a checkpoint directory, got a file")
    is_meta = (path / META_PARAMS).is_file() and any(path.glob(META_SHARD_GLOB))
    is_hf = (path / HF_CONFIG).is_file() and any((path / name).is_file() for pair in HF_WEIGHT_FILES for name in pair)
    if is_meta and is_hf:
        raise ValueError(f"{path}: holds both Meta's and Hugging Face's checkpoint files; pass format='meta' or 'hf'")
    if is_meta:
        return "meta"
    if is_hf:
        return "hf"
    hf_names = " or ".join(name for pair in HF_WEIGHT_FILES for name in pair)
    raise ValueError(f"{path}: not a checkpoint directory: expected Meta's {META_PARAMS} + consolidated.00.pth, ... "
                     f"or Hugging Face's {HF_CONFIG} + {hf_names}")


# --------------------------------------------------------------------------- expected names and shapes
def expected_shapes(config: CodeLlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of the model, by Meta's name, with the shape the config implies (in the model's order)."""
    dim, hidden, head_dim = config.dim, config.hidden_dim, config.head_dim
    q_dim, kv_dim = config.n_heads * head_dim, config.n_kv_heads * head_dim
    shapes = {"tok_embeddings.weight": (config.vocab_size, dim)}
    for i in range(config.n_layers):
        shapes.update({
            f"layers.{i}.attention.wq.weight": (q_dim, dim),
            f"layers.{i}.attention.wk.weight": (kv_dim, dim),
            f"layers.{i}.attention.wv.weight": (kv_dim, dim),
            f"layers.{i}.attention.wo.weight": (dim, q_dim),
            f"layers.{i}.feed_forward.w1.weight": (hidden, dim),
            f"layers.{i}.feed_forward.w2.weight": (dim, hidden),
            f"layers.{i}.feed_forward.w3.weight": (hidden, dim),
            f"layers.{i}.attention_norm.weight": (dim,),
            f"layers.{i}.ffn_norm.weight": (dim,),
        })
    shapes["norm.weight"] = (dim,)
    shapes["output.weight"] = (config.vocab_size, dim)
    return shapes


def _check_names(found, expected, where: str) -> None:
    """ValueError listing the missing and the unexpected names, if any."""
    found, expected = set(found), set(expected)
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    problems = []
    if missing:
        problems.append(f"missing {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected {_listing(unexpected)}")
    if problems:
        raise ValueError(f"{where}: " + "; ".join(problems))


def _check_shape(name: str, shape, expected: tuple[int, ...], where: str) -> None:
    if tuple(shape) != tuple(expected):
        raise ValueError(f"{where}: {name}: expected shape {tuple(expected)} from the config, got {tuple(shape)}")


def check_dtype(dtype) -> None:
    """load_checkpoint's dtype: None (the checkpoint's own) or a dtype the model's kernels run."""
    if dtype is not None and dtype not in FLOAT_DTYPES:
        expected = ", ".join(f"torch.{str(d).removeprefix('torch.')}" for d in FLOAT_DTYPES)
        raise TypeError(f"dtype: expected None or one of {expected}, got {dtype!r}")


def _check_dtypes(dtypes, dtype, where: str) -> None:
    """dtypes: (name, the stored dtype) pairs. Every weight is floating point; with dtype=None (each kept as stored)
    they must share one dtype the kernels run, or the model would fail at its first forward."""
    by_dtype: dict = {}
    for name, stored in dtypes:
        by_dtype.setdefault(stored, []).append(name)
    for stored, names in by_dtype.items():
        if stored not in CHECKPOINT_DTYPES:
            raise ValueError(f"{where}: {_listing(sorted(names), limit=3)}: expected floating-point weights, "
                             f"got {stored}")
    if dtype is None and (len(by_dtype) > 1 or next(iter(by_dtype)) not in FLOAT_DTYPES):
        held = "; ".join(f"{stored} ({_listing(sorted(names), limit=2)})" for stored, names in by_dtype.items())
        raise ValueError(f"dtype: None keeps the weights' stored dtype, but {where} holds {held}; "
                         f"pass dtype=torch.bfloat16, torch.float16 or torch.float32")


def _listing(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"{len(names)} name{'s' * (len(names) != 1)}: {shown}{more}"


# --------------------------------------------------------------------------- reading tensor files
def _open_torch_file(path: Path) -> dict[str, Tensor]:
    """A .pth/.bin state dict, memory-mapped: its tensors are read from disk when touched."""
    try:
        state = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
    except RuntimeError as e:  # e.g. a file in torch's pre-1.6 format, which cannot be mapped
        raise ValueError(f"{path}: cannot load with torch.load(mmap=True, weights_only=True): {e}") from e
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a dict of tensors (a state dict)")
    return state


class _SafetensorsFile:
    """A .safetensors file read one tensor at a time (shapes come from its header)."""

    def __init__(self, path: Path, stack: ExitStack):
        from safetensors import safe_open

        self.path = path
        try:
            self._file = stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
        except Exception as e:  # safetensors' own error (an empty or truncated file) names no path
            raise ValueError(f"{path}: not a readable safetensors file: {e}") from e

    def keys(self):
        return self._file.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._file.get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        stored = self._file.get_slice(name).get_dtype()
        return _SAFETENSORS_DTYPES.get(stored, stored)  # another (fp8, ...) kept as safetensors names it

    def get(self, name: str) -> Tensor:
        return self._file.get_tensor(name)


class _TorchFile:
    """The same interface over a memory-mapped .bin/.pth state dict."""

    def __init__(self, path: Path):
        self.path = path
        self._state = _open_torch_file(path)

    def keys(self):
        return self._state.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._state[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._state[name].dtype

    def get(self, name: str) -> Tensor:
        return self._state[name]


def _convert(tensor: Tensor, dtype, device) -> Tensor:
    """A converted copy owning its memory (the source may be backed by a mapped file): one copy, never two."""
    return tensor.to(device=device, dtype=dtype or tensor.dtype, copy=True)


# --------------------------------------------------------------------------- Meta's format
def _meta_shard_paths(path: Path) -> list[Path]:
    """consolidated.00.pth, consolidated.01.pth, ...: numbered from 0 without a gap."""
    numbered = {}
    for p in path.glob(META_SHARD_GLOB):
        match = _META_SHARD_RE.fullmatch(p.name)
        if match is None:
            raise ValueError(f"{p}: unexpected file name; expected consolidated.NN.pth")
        numbered[int(match.group(1))] = p
    if not numbered:
        raise FileNotFoundError(f"{path}: no consolidated.00.pth")
    missing = [i for i in range(max(numbered) + 1) if i not in numbered]
    if missing:
        found = ", ".join(p.name for _, p in sorted(numbered.items()))
        raise FileNotFoundError(f"{path}: missing shard(s) {missing} of Meta's consolidated.NN.pth (found {found})")
    return [numbered[i] for i in range(len(numbered))]


def meta_split_dim(name: str) -> int | None:
    """The dim along which Meta's model-parallel ranks split parameter ``name`` (None: replicated)."""
    parts = name.split(".")
    layer = parts[-2] if len(parts) >= 2 else parts[0]
    if layer not in META_SPLIT_DIMS:
        raise ValueError(f"{name}: not a parameter of Meta's Llama")
    return META_SPLIT_DIMS[layer]


def _merged_shape(name: str, shards: list[_TorchFile]) -> tuple[int, ...]:
    """The shape of ``name`` after the merge; ValueError where the shards' slices do not fit together."""
    shapes = [shard.shape(name) for shard in shards]
    dim = meta_split_dim(name)
    for shard, shape in zip(shards[1:], shapes[1:]):
        agree = len(shape) == len(shapes[0]) and all(
            a == b for d, (a, b) in enumerate(zip(shape, shapes[0])) if d != dim)
        if not agree:
            split = "replicated" if dim is None else f"split along dim {dim}"
            raise ValueError(f"{name}: shapes disagree between Meta's shards ({split}): "
                             f"{shards[0].path.name} has {shapes[0]}, {shard.path.name} has {shape}")
    if dim is None:
        return shapes[0]
    merged = list(shapes[0])
    merged[dim] = sum(shape[dim] for shape in shapes)
    return tuple(merged)


def _merge_meta_tensor(name: str, shards: list[_TorchFile], shape, dtype, device) -> Tensor:
    """One parameter, merged from the shards straight into its final buffer (converted as it is copied)."""
    dim = meta_split_dim(name)
    if dim is None or len(shards) == 1:
        return _convert(shards[0].get(name), dtype, device)
    first = shards[0].get(name)
    out = torch.empty(shape, dtype=dtype or first.dtype, device=device)
    offset = 0
    for shard in shards:
        part = shard.get(name)
        out.narrow(dim, offset, part.shape[dim]).copy_(part)
        offset += part.shape[dim]
    return out


def _check_meta_shard_count(shards: list[_TorchFile], config: CodeLlamaConfig) -> None:
    """The shard count the embedding's slice implies (dim / slice width) is the count found."""
    width = shards[0].shape("tok_embeddings.weight")[1]
    if width <= 0 or config.dim % width or config.dim // width != len(shards):
        implied = f"{config.dim // width}" if width > 0 and config.dim % width == 0 else "no whole number of"
        raise ValueError(f"{shards[0].path}: tok_embeddings.weight holds {width} of dim = {config.dim} columns, "
                         f"which implies {implied} shards; found {len(shards)} "
                         f"({', '.join(s.path.name for s in shards)})")


def _load_meta(path: Path, dtype, device) -> Checkpoint:
    params_path = path / META_PARAMS
    if not params_path.is_file():
        raise FileNotFoundError(f"{params_path}: Meta's params.json is missing")
    shards = [_TorchFile(p) for p in _meta_shard_paths(path)]

    names = [name for name in shards[0].keys() if name not in META_DROPPED]
    for shard in shards[1:]:
        _check_names([name for name in shard.keys() if name not in META_DROPPED], names,
                     f"{shard.path} (compared with {shards[0].path.name}; every shard holds the same names)")

    params = read_json_object(params_path, META_PARAMS)
    if params.get("vocab_size", -1) == -1 and "tok_embeddings.weight" in names:  # Llama 2's -1: the tokenizer's size
        params = {**params, "vocab_size": shards[0].shape("tok_embeddings.weight")[0]}
    config = CodeLlamaConfig.from_meta_params(params)

    expected = expected_shapes(config)
    where = f"{path} (Meta's format, {len(shards)} shard{'s' * (len(shards) != 1)})"
    _check_names(names, expected, where)
    _check_meta_shard_count(shards, config)
    merged_shapes = {name: _merged_shape(name, shards) for name in expected}
    for name, shape in merged_shapes.items():
        _check_shape(name, shape, expected[name], where)
    _check_dtypes(((f"{name} ({shard.path.name})", shard.dtype(name)) for name in expected for shard in shards),
                  dtype, where)

    state_dict = {name: _merge_meta_tensor(name, shards, merged_shapes[name], dtype, device) for name in expected}
    return Checkpoint(config=config, state_dict=state_dict, interleaved=True, format="meta")


# --------------------------------------------------------------------------- Hugging Face's format
def hf_to_meta_name(name: str) -> str | None:
    """transformers' Llama parameter name to Meta's; None for a buffer to drop. ValueError for an unknown name."""
    if _HF_DROPPED_RE.fullmatch(name):
        return None
    layer = _HF_LAYER_RE.fullmatch(name)
    if layer is not None and layer.group(2) in HF_LAYER_TO_META:
        return f"layers.{layer.group(1)}.{HF_LAYER_TO_META[layer.group(2)]}.weight"
    base = name.removesuffix(".weight")
    if name.endswith(".weight") and base in HF_TO_META:
        return f"{HF_TO_META[base]}.weight"
    raise ValueError(f"{name}: not a parameter of transformers' LlamaForCausalLM")


def _hf_weight_files(path: Path) -> list[Path]:
    """The weight files: a single file, or every shard an index names (each checked to exist)."""
    for single, index in HF_WEIGHT_FILES:
        if (path / index).is_file():
            weight_map = read_json_object(path / index, index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{path / index}: expected a non-empty 'weight_map'")
            files = sorted(set(weight_map.values()))
            for name in files:
                if not (path / name).is_file():
                    tensors = [t for t, f in weight_map.items() if f == name]
                    raise FileNotFoundError(f"{path / name}: missing shard, named by {index} "
                                            f"for {_listing(sorted(tensors), limit=3)}")
            return [path / name for name in files]
        if (path / single).is_file():
            return [path / single]
    names = ", ".join(name for pair in HF_WEIGHT_FILES for name in pair)
    raise FileNotFoundError(f"{path}: no Hugging Face weights ({names})")


def _load_hf(path: Path, dtype, device) -> Checkpoint:
    config_path = path / HF_CONFIG
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: Hugging Face's config.json is missing")
    hf_config = read_json_object(config_path, HF_CONFIG)
    config = CodeLlamaConfig.from_hf_config(hf_config)
    expected = expected_shapes(config)

    with ExitStack() as stack:
        files = [_SafetensorsFile(p, stack) if p.suffix == ".safetensors" else _TorchFile(p)
                 for p in _hf_weight_files(path)]
        sources, unknown = {}, []  # sources: Meta's name -> (file, transformers' name)
        for file in files:
            for hf_name in file.keys():
                try:
                    meta_name = hf_to_meta_name(hf_name)
                except ValueError:
                    unknown.append(hf_name)
                    continue
                if meta_name is None:
                    continue
                if meta_name in sources:
                    raise ValueError(f"{file.path}: {hf_name} is also in {sources[meta_name][0].path.name}")
                sources[meta_name] = (file, hf_name)

        tied = "output.weight" not in sources and hf_config.get("tie_word_embeddings", False)
        where = f"{path} (Hugging Face's format)"
        _check_names(set(sources) | set(unknown) | ({"output.weight"} if tied else set()), expected, where)
        for name, (file, hf_name) in sources.items():
            _check_shape(name, file.shape(hf_name), expected[name], f"{where}, {file.path.name}: {hf_name}")
        _check_dtypes(((hf_name, file.dtype(hf_name)) for file, hf_name in sources.values()), dtype, where)

        state_dict = {}
        for name in expected:
            if name == "output.weight" and tied:
                state_dict[name] = state_dict["tok_embeddings.weight"]
            else:
                file, hf_name = sources[name]
                state_dict[name] = _convert(file.get(hf_name), dtype, device)
    return Checkpoint(config=config, state_dict=state_dict, interleaved=False, format="hf")

