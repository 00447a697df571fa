"""The command lines' own behaviour: `python -m llama_kernels.aot`'s arguments and its scratch folder,
`llama-kernels validate`'s errors and backends. (The benchmark's command line: tests/test_bench.py.)"""

import os
import tempfile

import pytest
import safetensors.torch
import torch

from llama_kernels import _native, aot, cli


@pytest.fixture
def no_compile(monkeypatch, tmp_path):
    """aot.main with the compile replaced by a record of what it was asked for and where Triton would cache;
    temporary folders go to tmp_path/scratch, TRITON_INTERPRET and TRITON_CACHE_DIR unset."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    calls = []

    def check(targets, ops):
        calls.append((targets, ops, os.environ["TRITON_CACHE_DIR"]))
        return []

    monkeypatch.setattr(aot, "check", check)
    return scratch, calls


def test_aot_help_compiles_nothing(no_compile, capsys):
    _, calls = no_compile
    with pytest.raises(SystemExit) as exit_info:
        aot.main(["--help"])
    assert exit_info.value.code == 0 and calls == []
    assert "--arch" in capsys.readouterr().out


def test_aot_refuses_an_unknown_arch(no_compile, capsys):
    with pytest.raises(SystemExit) as exit_info:
        aot.main(["--arch", "sm70"])
    assert exit_info.value.code == 2 and no_compile[1] == []
    assert "invalid choice: 'sm70'" in capsys.readouterr().err


def test_aot_compiles_what_is_asked_in_a_folder_it_removes(no_compile):
    scratch, calls = no_compile
    assert aot.main(["--arch", "sm90", "--op", "rope", "--op", "decode"]) == 0
    (targets, ops, cache), = calls
    assert targets == ["sm90"] and ops == ["rope", "decode"]
    assert os.path.dirname(cache) == str(scratch)
    assert list(scratch.iterdir()) == [] and "TRITON_CACHE_DIR" not in os.environ


def test_aot_keep_keeps_the_folder_and_says_where(no_compile, capsys):
    scratch, calls = no_compile
    assert aot.main(["--keep"]) == 0
    (targets, ops, cache), = calls
    assert targets == tuple(aot.TARGETS) and ops == aot.OPS
    assert list(scratch.iterdir()) == [scratch / os.path.basename(cache)]
    assert cache in capsys.readouterr().out


def test_aot_leaves_the_users_cache_dir_alone(no_compile, monkeypatch, tmp_path):
    scratch, calls = no_compile
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "mine"))
    assert aot.main([]) == 0
    assert calls[0][2] == str(tmp_path / "mine") and os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "mine")
    assert list(scratch.iterdir()) == []


def broken_checkpoint(directory):
    """A Hugging Face checkpoint whose weights are not the config's."""
    directory.mkdir()
    (directory / "config.json").write_text('{"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, '
                                           '"intermediate_size": 128, "vocab_size": 96}')
    safetensors.torch.save_file({"model.embed_tokens.weight": torch.randn(3, 5)}, directory / "model.safetensors")
    return directory


@pytest.mark.parametrize("arguments, expected", [
    (["--config", "CodeLlama-8b"], "argument --config: name: unknown Code Llama variant 'CodeLlama-8b'"),
    (["--checkpoint", "{tmp}/absent"], "argument --checkpoint: {tmp}/absent: no such checkpoint directory"),
    (["--checkpoint", "{tmp}"], "argument --checkpoint: {tmp}: not a checkpoint directory"),
    (["--checkpoint", "{tmp}/broken"], "argument --checkpoint: "),
])
def test_validate_refuses_a_bad_model_in_one_line(arguments, expected, tmp_path, capsys):
    broken_checkpoint(tmp_path / "broken")
    arguments = [a.format(tmp=tmp_path) for a in arguments]
    assert cli.main(["validate", *arguments]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.endswith("\n")
    assert captured.err.startswith(f"llama-kernels validate: error: {expected.format(tmp=tmp_path)}"), captured.err


def test_validate_on_the_cpu_names_each_backend_it_ran(capsys):
    """Under this suite's TRITON_INTERPRET=1 the command runs in process: the Triton kernels in the interpreter,
    then the C++ kernels CPU tensors get."""
    assert cli.main(["validate", "--tokens", "9", "--new-tokens", "2"]) == 0
    report = capsys.readouterr().out
    assert "backend triton: the Triton kernels in Triton's interpreter vs the reference" in report
    if _native.available("cpu"):
        assert "backend native: the C++ kernels (what CPU tensors run) vs the reference" in report
    else:
        assert "backend native: not validated, the extension is not built" in report
    assert report.count("greedy generation: the same 2 tokens") == (2 if _native.available("cpu") else 1)
