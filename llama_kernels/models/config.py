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
from dataclasses import asdict, dataclass, field
from pathlib import Path


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
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.dim % self.n_heads:
            raise ValueError(f"dim: expected a multiple of n_heads = {self.n_heads}, got {self.dim}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads: expected a divisor of n_heads = {self.n_heads}, got {self.n_kv_heads}")

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
        key = name.split("/")[-1].lower().removesuffix("-hf")
        if key not in _VARIANTS:
            known = ", ".join(sorted(_VARIANTS_DISPLAY))
            raise ValueError(f"name: unknown Code Llama variant {name!r}; expected one of {known}")
        return _VARIANTS[key]

    @classmethod
    def from_meta_params(cls, params: str | Path | dict) -> CodeLlamaConfig:
        """From Meta's ``params.json`` (a path, or its dict)."""
        params = _read_json(params)
        known = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
                 "norm_eps", "rope_theta", "max_seq_len"}
        config = {k: v for k, v in params.items() if k in known}
        if config.get("vocab_size", -1) <= 0:  # Meta's files say -1 and leave it to the tokenizer
            raise ValueError(f"params.json: expected a positive vocab_size, got {params.get('vocab_size')}")
        return cls(**config)

    @classmethod
    def from_hf_config(cls, config: str | Path | dict) -> CodeLlamaConfig:
        """From a Hugging Face ``config.json`` of a Llama model (a path, or its dict).

        The FFN width is stored there, not a rule: the published Code Llama widths are
        given back as Meta's rule; any other width is kept as ``ffn_hidden_dim``.
        """
        hf = _read_json(config)
        dim, hidden = hf["hidden_size"], hf["intermediate_size"]
        n_heads = hf["num_attention_heads"]
        if hf.get("head_dim") not in (None, dim // n_heads):
            raise ValueError(f"config.json: head_dim {hf['head_dim']} != hidden_size / num_attention_heads")
        # transformers 4.x: rope_theta and rope_scaling; 5.x: one rope_parameters dict holding both.
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_theta = hf.get("rope_theta") or rope.pop("rope_theta", 10000.0)
        rope.pop("rope_theta", None)
        rope_scaling = rope if rope.get("rope_type", rope.get("type", "default")) != "default" else None
        return cls(dim=dim, n_layers=hf["num_hidden_layers"], n_heads=n_heads,
                   n_kv_heads=hf.get("num_key_value_heads", n_heads), vocab_size=hf["vocab_size"],
                   **_ffn_rule_for(dim, hidden), norm_eps=hf.get("rms_norm_eps", 1e-5),
                   rope_theta=float(rope_theta), max_seq_len=hf.get("max_position_embeddings", 16384),
                   rope_scaling=rope_scaling)

    def to_hf_config(self) -> dict:
        """The transformers ``LlamaConfig`` keyword arguments of the same model."""
        return {"hidden_size": self.dim, "intermediate_size": self.hidden_dim, "num_hidden_layers": self.n_layers,
                "num_attention_heads": self.n_heads, "num_key_value_heads": self.n_kv_heads,
                "vocab_size": self.vocab_size, "rms_norm_eps": self.norm_eps, "rope_theta": self.rope_theta,
                "max_position_embeddings": self.max_seq_len, "rope_scaling": self.rope_scaling,
                "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False}

    def to_dict(self) -> dict:
        return asdict(self)


def _read_json(source: str | Path | dict) -> dict:
    if isinstance(source, dict):
        return source
    path = Path(source)
    if path.is_dir():
        raise ValueError(f"{path}: expected a JSON file, got a directory")
    return json.loads(path.read_text())


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
