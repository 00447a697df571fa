"""Code Llama's architecture hyperparameters: the published variants by name, and Meta's / Hugging Face's files.

The numbers follow Meta's ``params.json`` files and the Code Llama paper (Roziere et al.,
2023, table 1 and section 2.4). Every variant is Llama 2's block (pre-norm RMSNorm,
SwiGLU, RoPE) with the RoPE base raised to 1,000,000 for long-context fine-tuning at
16,384 tokens. The FFN width comes from Meta's rule (``hidden_dim``), so a config
holds only what Meta's params.json holds.

Where sources disagree (the 70B variants, released months after the others), this file says:
- Context: the published 70B configs and providers' listings give 4,096 positions for some
  70B variants and 16,384 for others; ``max_seq_len`` is only the trained context (the math
  does not depend on it), and every variant here says 16,384, Meta's figure for Code Llama.
- Vocabulary: 32,016 (32,000 + the four infilling tokens + padding to a multiple of 16) for
  the 7B and 13B models and every 70B model (its published configs); 32,000 for the 7B and
  13B Python variants and all 34B variants, which were trained without infilling. The 70B
  model cards do not list infilling: the tokens exist there, the training did not use them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .._checks import check_positive_int, check_real
from ..rope_scaling import rope_inv_freq


@dataclass(frozen=True)
class CodeLlamaConfig:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: as many as n_heads (no GQA)
    vocab_size: int = 32016
    multiple_of: int = 256  # the FFN width is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 1_000_000.0
    max_seq_len: int = 16384  # the context the model was trained at (LCFT); the model runs past it
    rope_scaling: dict | None = field(default=None, hash=False)  # transformers' rope_scaling dict, if any
    ffn_hidden_dim: int | None = None  # a width Meta's rule does not give (other Llama models' configs)

    def __post_init__(self):
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "max_seq_len"):
            check_positive_int(name, getattr(self, name))
        for name in ("n_kv_heads", "ffn_hidden_dim"):
            if getattr(self, name) is not None:
                check_positive_int(name, getattr(self, name))
        if self.ffn_dim_multiplier is not None:
            check_real("ffn_dim_multiplier", self.ffn_dim_multiplier, above=0)
        check_real("norm_eps", self.norm_eps, above=0)
        check_real("rope_theta", self.rope_theta, above=1)
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.dim % self.n_heads:
            raise ValueError(f"dim: expected a multiple of n_heads = {self.n_heads}, got {self.dim}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads: expected a divisor of n_heads = {self.n_heads}, got {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"dim: expected dim / n_heads even (RoPE rotates pairs), got {self.dim} / {self.n_heads}")
        try:  # every key each rope type needs, now rather than at the first forward
            rope_inv_freq(self.head_dim, self.rope_theta, self.rope_scaling, max_position_embeddings=self.max_seq_len)
        except (TypeError, ValueError) as error:
            raise type(error)(f"rope_scaling: {error}") from None

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        """Meta's FFN width: 2/3 of 4 * dim, times ffn_dim_multiplier, rounded up to multiple_of."""
        if self.ffn_hidden_dim is not None:
            return self.ffn_hidden_dim
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_name(cls, name: str) -> CodeLlamaConfig:
        """A published variant: ``CodeLlama-7b``, ``CodeLlama-13b-Python``, ``CodeLlama-70b-Instruct``, ...
        (case-insensitive, an ``-hf`` suffix and a ``codellama/`` or ``meta-llama/`` prefix are accepted)."""
        if not isinstance(name, str):
            raise TypeError(f"name: expected a Code Llama variant's name (str), got {type(name).__name__}")
        key = name.split("/")[-1].lower().removesuffix("-hf")
        if key not in _VARIANTS:
            known = ", ".join(sorted(_VARIANTS_DISPLAY))
            raise ValueError(f"name: unknown Code Llama variant {name!r}; expected one of {known}")
        return _VARIANTS[key]

    @classmethod
    def from_meta_params(cls, params: str | Path | dict) -> CodeLlamaConfig:
        """From Meta's ``params.json`` (a path, or its dict). Its keys are this class's fields; a key this model
        does not implement is refused, as is a missing size (Meta's ModelArgs would fill in 7B's)."""
        params = read_json_object(params, "params.json")
        unknown = sorted(set(params) - _META_FIELDS - {"use_scaled_rope"})
        if unknown:
            raise ValueError(f"params.json: {', '.join(unknown)}: not a field of Code Llama's params.json "
                             f"(expected some of {', '.join(sorted(_META_FIELDS))})")
        if params.get("use_scaled_rope"):
            raise ValueError("params.json: use_scaled_rope: Llama 3.1's RoPE scaling is not implemented here; "
                             "expected false or absent")
        _require(params, ("dim", "n_layers", "n_heads"), "params.json")
        if params.get("vocab_size", -1) == -1:  # Meta's files say -1 and leave it to the tokenizer
            raise ValueError("params.json: vocab_size: expected a positive int, got -1 or nothing (the checkpoint "
                             "loader reads it off tok_embeddings.weight)")
        return cls(**{k: v for k, v in params.items() if k in _META_FIELDS})

    @classmethod
    def from_hf_config(cls, config: str | Path | dict) -> CodeLlamaConfig:
        """From a Hugging Face ``config.json`` of a Llama model (a path, or its dict).

        The FFN width is stored there, not a rule: the published Code Llama widths are
        given back as Meta's rule; any other width is kept as ``ffn_hidden_dim``. A field
        whose value changes the math in a way this model does not implement (another
        activation, biases, dropout) is refused, naming it; errors name config.json's fields.
        """
        hf = read_json_object(config, "config.json")
        _require(hf, [field for field in _HF_FIELDS.values() if field not in _HF_OPTIONAL], "config.json")
        if hf.get("model_type", "llama") != "llama":
            raise ValueError(f"config.json: model_type: expected 'llama', got {hf['model_type']!r}")
        for field, supported in _HF_MATH.items():
            if field in hf and hf[field] not in supported:
                raise ValueError(f"config.json: {field}: this model implements only {supported[0]!r}, "
                                 f"got {hf[field]!r}")
        # transformers 4.x: rope_theta and rope_scaling; 5.x: one rope_parameters dict holding both.
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_theta = hf.get("rope_theta") or rope.pop("rope_theta", 10000.0)
        rope.pop("rope_theta", None)
        rope_scaling = rope if rope.get("rope_type", rope.get("type", "default")) != "default" else None
        fields = {field: hf[hf_field] for field, hf_field in _HF_FIELDS.items() if hf_field in hf}
        try:  # the checks live in __post_init__; their messages are given config.json's names
            config = cls(**{**fields, "rope_theta": rope_theta, "rope_scaling": rope_scaling})
        except (TypeError, ValueError) as error:
            field, _, reason = str(error).partition(": ")
            raise type(error)(f"config.json: {_HF_FIELDS.get(field, field)}: {reason}") from None
        if hf.get("head_dim") not in (None, config.head_dim):
            raise ValueError(f"config.json: head_dim: expected hidden_size / num_attention_heads = {config.head_dim} "
                             f"(or no head_dim), got {hf['head_dim']!r}")
        return replace(config, **{"ffn_hidden_dim": None, **_ffn_rule_for(config.dim, config.ffn_hidden_dim)})

    def to_hf_config(self) -> dict:
        """The transformers ``LlamaConfig`` keyword arguments of the same model."""
        return {"hidden_size": self.dim, "intermediate_size": self.hidden_dim, "num_hidden_layers": self.n_layers,
                "num_attention_heads": self.n_heads, "num_key_value_heads": self.n_kv_heads,
                "vocab_size": self.vocab_size, "rms_norm_eps": self.norm_eps, "rope_theta": self.rope_theta,
                "max_position_embeddings": self.max_seq_len, "rope_scaling": self.rope_scaling,
                "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False}

    def to_dict(self) -> dict:
        return asdict(self)


# Meta's params.json keys: this class's fields but the FFN width it does not store.
_META_FIELDS = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
                "norm_eps", "rope_theta", "max_seq_len"}
# config.json's name of each field (the rope fields are read apart); all but _HF_OPTIONAL are required.
_HF_FIELDS = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
              "n_kv_heads": "num_key_value_heads", "vocab_size": "vocab_size", "norm_eps": "rms_norm_eps",
              "max_seq_len": "max_position_embeddings", "ffn_hidden_dim": "intermediate_size"}
_HF_OPTIONAL = {"num_key_value_heads", "rms_norm_eps", "max_position_embeddings"}
# LlamaConfig's (transformers 5.x) other fields that change the math, with the values this model computes.
# tie_word_embeddings is supported (the checkpoint loader ties the output to the embedding); pretraining_tp is
# read by no 5.x forward; rope types are checked by rope_inv_freq and CodeLlama.
_HF_MATH = {"hidden_act": ("silu", "swish"), "attention_bias": (False,), "mlp_bias": (False,),
            "attention_dropout": (0.0,)}


def read_json_object(source: str | Path | dict, what: str) -> dict:
    """A JSON file's object (or the dict itself); ValueError naming the path for bad JSON or another type."""
    if isinstance(source, dict):
        return source
    if not isinstance(source, (str, Path)):
        raise TypeError(f"{what}: expected a path or a dict, got {type(source).__name__}")
    path = Path(source)
    if path.is_dir():
        raise ValueError(f"{path}: expected a JSON file, got a directory")
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object ({what}), got a JSON {type(value).__name__}")
    return value


def _require(source: dict, fields, what: str) -> None:
    missing = [field for field in fields if field not in source]
    if missing:
        raise ValueError(f"{what}: {', '.join(missing)}: missing (required)")


def _ffn_rule_for(dim: int, hidden: int) -> dict:
    """Meta's (multiple_of, ffn_dim_multiplier) that give ``hidden`` for ``dim``, or the width itself."""
    for multiple_of in (256, 4096):  # Llama 2's and Code Llama 70B's
        for multiplier in (None, 1.0, 1.3):
            rule = {"multiple_of": multiple_of, "ffn_dim_multiplier": multiplier}
            if CodeLlamaConfig(dim=dim, n_heads=1, vocab_size=1, **rule).hidden_dim == hidden:
                return rule
    return {"ffn_hidden_dim": hidden}


# ---------------------------------------------------------------------- the published variants
def _sizes() -> dict[str, dict]:
    return {
        "7b": dict(dim=4096, n_layers=32, n_heads=32),
        "13b": dict(dim=5120, n_layers=40, n_heads=40),
        "34b": dict(dim=8192, n_layers=48, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.0),
        "70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=4096),
    }


def _build_variants() -> tuple[dict[str, CodeLlamaConfig], list[str]]:
    variants, display = {}, []
    for size, shape in _sizes().items():
        for flavour in ("", "-Python", "-Instruct"):
            vocabulary_of_32016 = size == "70b" or (flavour != "-Python" and size != "34b")
            name = f"CodeLlama-{size}{flavour}"
            variants[name.lower()] = CodeLlamaConfig(**shape, vocab_size=32016 if vocabulary_of_32016 else 32000)
            display.append(name)
    return variants, display


_VARIANTS, _VARIANTS_DISPLAY = _build_variants()
