"""The README's Python snippets run as written, on the CPU at small sizes.

Each ```python block of README.md runs in a fresh interpreter without TRITON_INTERPRET (so CPU tensors run
what a CPU user gets: the C++ kernels, or the reference where they are not built), after the substitutions of
``SUBSTITUTIONS``, the only differences from what a user reads: the CPU for the GPU, small sizes for Code
Llama's, a tiny checkpoint this file writes for the downloaded ones, and a one-process gloo group for
torchrun's NCCL ranks.
"""

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_tokenizer import INFILLING, train

REPO = Path(__file__).resolve().parent.parent
SNIPPET = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)
HEADING = re.compile(r"^## (.*)$", re.MULTILINE)

# README text (a regular expression) -> what runs instead. "{checkpoint}" is the tiny checkpoint's directory.
SUBSTITUTIONS = {
    r'device="cuda"': 'device="cpu"',
    r"\b16384\b": "256",  # tokens; the varlen example's two sequences of 100 and 16284 become 100 and 156
    r"\b16284\b": "156",
    r"\b100_000\b": "1024",  # the KV cache's capacity
    r"\b131072\b": "256",  # ring attention's sequence
    r"max_new_tokens=64": "max_new_tokens=8",
    r'"(codellama/)?CodeLlama-7b-hf"': '"{checkpoint}"',
    r'"nccl"': '"gloo"',
    r"torch\.cuda\.set_device\(rank\)": "pass",
}


def snippets() -> list[tuple[str, str]]:
    """(the section's heading, the code) of every python block, in order."""
    text = (REPO / "README.md").read_text()
    found = []
    for match in SNIPPET.finditer(text):
        headings = HEADING.findall(text, 0, match.start())
        found.append((headings[-1] if headings else "top", match.group(1)))
    return found


def for_the_cpu(code: str, checkpoint: Path) -> str:
    for pattern, replacement in SUBSTITUTIONS.items():
        code = re.sub(pattern, replacement.replace("{checkpoint}", str(checkpoint)), code)
    return code


def test_every_substitution_still_applies():
    """A substitution the README no longer matches would let a snippet run at Code Llama's sizes, or on CUDA."""
    code = "\n".join(code for _, code in snippets())
    assert [pattern for pattern in SUBSTITUTIONS if not re.search(pattern, code)] == []
    assert not re.search(r"cuda", for_the_cpu(code, Path("ckpt")).replace("torch.cuda.", ""))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny Hugging Face Llama checkpoint (2 layers, 2 query heads of 64 over 1 key/value head) with a
    SentencePiece tokenizer that has Code Llama's infilling tokens."""
    transformers = pytest.importorskip("transformers")
    directory = tmp_path_factory.mktemp("checkpoint")
    train(directory, INFILLING).rename(directory / "tokenizer.model")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=400, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                                      rope_theta=1e6, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("index", range(len(snippets())), ids=[heading for heading, _ in snippets()])
def test_readme_snippet_runs(index, checkpoint):
    code = for_the_cpu(snippets()[index][1], checkpoint)
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1")  # for gloo
    run = subprocess.run([sys.executable, "-c", code], cwd=checkpoint, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, f"{code}\n{run.stdout}\n{run.stderr[-4000:]}"
