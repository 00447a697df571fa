"""Which attention the model and ``patch_hf_llama`` run, per card and phase: ours, or torch's SDPA where a card's
measurements say SDPA's best backend beats ours (until our kernels meet their targets, never slower than what
the user had).

``attention_choice.json`` (beside ``tuned_configs.json``) holds the measured choices:
``{target: {"forward" | "backward" | "decode": "sdpa" | "llama_kernels", "measured": what it rests on}}``;
``bench/gpu_check.py`` proposes a card's entry from its benchmark rows (``proposed_entry``). A target or phase not
in it runs ours, and so do CPU tensors (their target, "interpreter", is never in it: the C++ kernels win there).

Choices: "auto" (the table's, said once per (card, phase) by a warning when it is SDPA), "llama_kernels" (ours
always), "sdpa" (SDPA always). Phases: "decode" (queries after a KV cache's tokens), "backward" (grad enabled and an
input requires it: the forward and backward of one autograd op cannot be split between the two, so training takes
the backward's entry for both), "forward" otherwise.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from ._triton import target_of

CHOICES = ("auto", "llama_kernels", "sdpa")
PHASES = ("forward", "backward", "decode")
ATTENTION_CHOICE_PATH = Path(__file__).with_name("attention_choice.json")
# The benchmark's case timing each phase (llama_kernels/bench/cases.py), compared with the SDPA rows of it.
PHASE_CASES = {"forward": "attention_causal", "backward": "attention_bwd_causal", "decode": "decode"}

_TABLE = json.loads(ATTENTION_CHOICE_PATH.read_text())  # read at import: torch.compile traces the lookups
_warned: set = set()  # the (target, phase) pairs already told that auto runs SDPA


def attention_table() -> dict:
    return _TABLE


def check_choice(name: str, value, *, also: tuple = ()):
    """``value``, one of CHOICES or (the same object) of ``also`` (patch_hf_llama's True and False)."""
    if any(value is other for other in also):
        return value
    expected = f"{', '.join(map(repr, also))} or one of {CHOICES}" if also else f"one of {CHOICES}"
    if not isinstance(value, str):
        raise TypeError(f"{name}: expected {expected}, got {value!r}")
    if value not in CHOICES:
        raise ValueError(f"{name}: expected {expected}, got {value!r}")
    return value


def phase_of(decoding: bool, *inputs: torch.Tensor) -> str:
    if decoding:
        return "decode"
    return "backward" if torch.is_grad_enabled() and any(t.requires_grad for t in inputs) else "forward"


def attention_for(choice: str, device: torch.device, phase: str) -> str:
    """"llama_kernels" or "sdpa": what ``choice`` runs for ``phase`` on ``device``."""
    if choice != "auto":
        return choice
    target = target_of(device)
    entry = attention_table().get(target, {})
    chosen = entry.get(phase, "llama_kernels")
    # A compiled graph cannot warn (fullgraph refuses it): an eager call says it.
    if chosen == "sdpa" and (target, phase) not in _warned and not torch.compiler.is_compiling():
        _warned.add((target, phase))
        warnings.warn(f"llama_kernels: attention='auto' runs torch's SDPA for the {phase} on {target}, where it "
                      f"measured faster than ours ({entry.get('measured', 'attention_choice.json')}); "
                      f"attention='llama_kernels' runs ours", stacklevel=3)
    return chosen


def proposed_entry(rows: list[dict], measured: str) -> dict:
    """A card's table entry from its benchmark rows (``run_benchmark``'s): per phase, "sdpa" where SDPA's best
    backend beats ours at any shape measured ("never slower"), else ours; a phase without both is left out."""
    entry = {}
    for phase, case in PHASE_CASES.items():
        timed = [row for row in rows if row["case"] == case and row["status"] == "ok"]
        ours = {row["shape_label"]: row["median_ms"] for row in timed if row["provider"] == "ours"}
        sdpa: dict[str, float] = {}
        for row in timed:
            if row["provider"].startswith("sdpa") and row["shape_label"] in ours:
                sdpa[row["shape_label"]] = min(row["median_ms"], sdpa.get(row["shape_label"], float("inf")))
        if sdpa:
            entry[phase] = "sdpa" if any(sdpa[shape] < ours[shape] for shape in sdpa) else "llama_kernels"
    return {**entry, "measured": measured} if entry else {}
