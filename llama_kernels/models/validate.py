"""``llama-kernels validate``: the model on the kernels against the same model on the reference.

    llama-kernels validate [--config CodeLlama-7b] [--checkpoint DIR] [--tokens 64] [--new-tokens 32]

Builds ``CodeLlama`` (from the checkpoint, or with random weights at a reduced size that
keeps the variant's head layout: head_dim, query heads per key/value head, RoPE base,
vocabulary), runs one prompt through the kernels and through ``llama_kernels.reference``,
and prints the largest absolute and relative differences of each layer's hidden state
and of the logits, how often the next-token predictions agree, and whether greedy
generation gives the same tokens. On a machine without CUDA it validates two backends:
the Triton kernels in Triton's interpreter (the command re-runs itself with
``TRITON_INTERPRET=1``) and the C++ kernels ("native"), which CPU tensors run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from pathlib import Path

import torch

from .. import _native
from .checkpoint import detect_format
from .code_llama import CodeLlama
from .config import CodeLlamaConfig

REDUCED_QUERY_HEADS = 8  # the reduced model: 2 layers, 8 query heads, the variant's head_dim and grouping


def reduced_config(name: str) -> CodeLlamaConfig:
    """The variant shrunk to run in a minute on a CPU: 2 layers and 8 query heads of the variant's head_dim
    and query-per-key/value grouping, its RoPE base, norm epsilon and vocabulary."""
    full = CodeLlamaConfig.from_name(name)
    group = full.n_heads // full.n_kv_heads
    return CodeLlamaConfig(dim=REDUCED_QUERY_HEADS * full.head_dim, n_layers=2, n_heads=REDUCED_QUERY_HEADS,
                           n_kv_heads=max(1, REDUCED_QUERY_HEADS // group), vocab_size=full.vocab_size,
                           norm_eps=full.norm_eps, rope_theta=full.rope_theta, max_seq_len=full.max_seq_len)


def random_model(config: CodeLlamaConfig, dtype: torch.dtype, device) -> CodeLlama:
    torch.manual_seed(0)
    model = CodeLlama(config)
    with torch.no_grad():
        for name, p in model.named_parameters():  # scaled so that activations stay O(1) through the layers
            p.normal_(1.0, 0.1) if name.endswith("norm.weight") else p.normal_(0.0, p.shape[-1] ** -0.5)
    return model.to(device=device, dtype=dtype)


def compare(model: CodeLlama, tokens: torch.Tensor, new_tokens: int, backends=("triton",)) -> dict:
    """Per backend: per-layer hidden states, logits, next-token agreement and greedy generation against the
    reference's."""
    hidden, logits, generated = _run(model, "reference", tokens, new_tokens)
    results = {}
    for backend in backends:
        ours_hidden, ours_logits, ours_generated = _run(model, backend, tokens, new_tokens)
        first_difference = next((i for i, (a, b) in enumerate(zip(ours_generated[0], generated[0])) if a != b), None)
        results[backend] = {
            "layers": [_difference(a, b) for a, b in zip(ours_hidden, hidden)],
            "logits": _difference(ours_logits, logits),
            "top1_agreement": (ours_logits.argmax(-1) == logits.argmax(-1)).float().mean().item(),
            "greedy_match": ours_generated == generated,
            "greedy_first_difference": first_difference,
            "new_tokens": new_tokens,
        }
    return results


def _run(model: CodeLlama, backend: str, tokens: torch.Tensor, new_tokens: int):
    """Each layer's hidden state, the logits and the greedy tokens of the model on one backend."""
    model.backend = backend
    hidden = []
    hooks = [layer.register_forward_hook(lambda m, i, out: hidden.append((out[0] + out[1]).float()))
             for layer in model.layers]
    with torch.inference_mode():
        logits = model(tokens).float()
    for hook in hooks:
        hook.remove()
    return hidden, logits, model.generate(tokens.tolist(), max_new_tokens=new_tokens)


def _difference(a: torch.Tensor, b: torch.Tensor) -> dict:
    err = (a - b).abs()
    return {"max_abs": err.max().item(), "max_rel": (err.max() / b.abs().max()).item()}


def format_report(result: dict, header: str) -> str:
    lines = [header, f"{'':12} {'max |diff|':>12} {'max |diff| / max |ref|':>24}"]
    for i, d in enumerate(result["layers"]):
        lines.append(f"{'layer ' + str(i):12} {d['max_abs']:12.3e} {d['max_rel']:24.3e}")
    d = result["logits"]
    lines.append(f"{'logits':12} {d['max_abs']:12.3e} {d['max_rel']:24.3e}")
    lines.append(f"next-token predictions agree at {result['top1_agreement']:.1%} of positions")
    if result["greedy_match"]:
        lines.append(f"greedy generation: the same {result['new_tokens']} tokens")
    else:
        lines.append(f"greedy generation: DIFFERS from token {result['greedy_first_difference']}")
    return "\n".join(lines)


# What each backend validated is, in the report's words
BACKEND_NAMES = {"triton": "the Triton kernels", "native": "the C++ kernels (what CPU tensors run)"}


def backends(device: torch.device) -> tuple[str, ...]:
    """On a GPU the Triton kernels; on the CPU the Triton kernels (in the interpreter) and the C++ kernels that
    CPU users get, when the extension is built."""
    if device.type == "cuda" or not _native.available("cpu"):
        return ("triton",)
    return ("triton", "native")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="CodeLlama-7b", help="a published variant (reduced to 2 layers and 8 "
                        "query heads when no checkpoint is given; default CodeLlama-7b)")
    parser.add_argument("--checkpoint", help="a Meta or Hugging Face checkpoint directory (its own config is used)")
    parser.add_argument("--tokens", type=int, default=64, help="prompt length (default 64)")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens compared (default 32)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="default: bfloat16 on a GPU, float32 on the CPU")


def run_from_args(args: argparse.Namespace) -> int:
    """The report on stdout; exit status 1 if a backend's greedy tokens differ from the reference's, 2 (with one
    line on stderr) for a --config or --checkpoint that names no model."""
    try:
        _check_source(args)
    except (OSError, ValueError) as e:
        return _usage_error("--checkpoint" if args.checkpoint else "--config", e)
    cuda = torch.cuda.is_available()
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        # The kernels were compiled for the interpreter only if it was on at import: start again with it.
        argv = ["--config", args.config, "--tokens", str(args.tokens), "--new-tokens", str(args.new_tokens)]
        argv += ["--checkpoint", args.checkpoint] if args.checkpoint else []
        argv += ["--dtype", args.dtype] if args.dtype else []
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        return subprocess.run([sys.executable, "-m", "llama_kernels.models.validate", *argv], env=env).returncode
    device = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    if args.checkpoint:
        try:  # the names, shapes and files are checked as the checkpoint loads
            model = CodeLlama.from_pretrained(args.checkpoint, dtype=dtype, device=device)
        except (OSError, ValueError) as e:
            return _usage_error("--checkpoint", e)
        what = f"checkpoint {args.checkpoint}"
    else:
        model = random_model(reduced_config(args.config), dtype, device)
        c = model.config
        what = (f"{args.config} reduced to {c.n_layers} layers, dim {c.dim}, {c.n_heads}/{c.n_kv_heads} heads of "
                f"{c.head_dim}, random weights")
    torch.manual_seed(1)
    tokens = torch.randint(0, model.config.vocab_size, (1, args.tokens), device=device)
    print(f"llama-kernels validate: {what}; {str(dtype)[6:]} on {device.type}; {args.tokens} prompt tokens")
    if device.type == "cpu" and not _native.available("cpu"):
        print("backend native: not validated, the extension is not built (CPU tensors run the reference)")
    results = compare(model.eval(), tokens, args.new_tokens, backends(device))
    for backend, result in results.items():
        interpreted = " in Triton's interpreter" if backend == "triton" and device.type == "cpu" else ""
        print(format_report(result, f"\nbackend {backend}: {BACKEND_NAMES[backend]}{interpreted} vs the reference"))
    return 0 if all(result["greedy_match"] for result in results.values()) else 1


def _check_source(args: argparse.Namespace) -> None:
    """Before anything is built (or the command restarts in the interpreter): the checkpoint is a directory of
    a known format, or the config a published variant."""
    if args.checkpoint:
        detect_format(Path(args.checkpoint))
    else:
        CodeLlamaConfig.from_name(args.config)


def _usage_error(option: str, error: Exception) -> int:
    """argparse's convention: one line on stderr, exit status 2."""
    print(f"llama-kernels validate: error: argument {option}: {' '.join(str(error).splitlines())}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="llama-kernels validate", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
