"""Code Llama's tokenizer wrapper and infilling prompt formats.

The prompt formats are checked against hand-assembled token lists on a toy
character tokenizer; CodeLlamaTokenizer itself on a tiny SentencePiece model
trained here in Llama's configuration (BPE, byte fallback, no normalisation),
when sentencepiece is installed.
"""

import pytest

from llama_kernels.models.tokenizer import CodeLlamaTokenizer, infilling_prompt, stop_tokens


class ToyTokenizer:
    """One id per character; like SentencePiece, ``encode`` prepends a space."""

    bos_id, eos_id, pad_id = 1, 2, -1
    prefix_id, middle_id, suffix_id, eot_id = 3, 4, 5, 6
    SPACE = 32 + 100

    def encode(self, s, bos=True, eos=False):
        ids = self.encode_infilling(" " + s)
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def encode_infilling(self, s):
        return [ord(c) + 100 for c in s]


class ToyWithoutInfilling(ToyTokenizer):
    """Like Code Llama 34B and Code Llama - Python: no infilling tokens."""

    prefix_id = middle_id = suffix_id = eot_id = None


def chars(s):
    return [ord(c) + 100 for c in s]


PREFIX = "def f(x):\n    "
SUFFIX = "\n    return y\n"


def test_prefix_suffix_middle():
    tok = ToyTokenizer()
    expected = [1, 3, ToyTokenizer.SPACE] + chars(PREFIX) + [5] + chars(SUFFIX) + [4]
    assert infilling_prompt(tok, PREFIX, SUFFIX) == expected
    assert infilling_prompt(tok, PREFIX, SUFFIX, suffix_first=False) == expected


def test_suffix_prefix_middle():
    tok = ToyTokenizer()
    expected = [1, 3, 5] + chars(SUFFIX) + [4, ToyTokenizer.SPACE] + chars(PREFIX)
    assert infilling_prompt(tok, PREFIX, SUFFIX, suffix_first=True) == expected


def test_empty_prefix_and_suffix():
    tok = ToyTokenizer()
    assert infilling_prompt(tok, "", "") == [1, 3, ToyTokenizer.SPACE, 5, 4]
    assert infilling_prompt(tok, "", "", suffix_first=True) == [1, 3, 5, 4, ToyTokenizer.SPACE]


@pytest.mark.parametrize("suffix_first", [False, True])
def test_missing_infilling_tokens(suffix_first):
    with pytest.raises(ValueError) as info:
        infilling_prompt(ToyWithoutInfilling(), PREFIX, SUFFIX, suffix_first=suffix_first)
    assert all(piece in str(info.value) for piece in ("▁<PRE>", "▁<SUF>", "▁<MID>"))


def test_missing_one_token_is_named():
    tok = ToyTokenizer()
    tok.middle_id = None
    with pytest.raises(ValueError) as info:
        infilling_prompt(tok, PREFIX, SUFFIX)
    assert "▁<MID>" in str(info.value)
    assert "▁<PRE>" not in str(info.value)


def test_stop_tokens():
    assert stop_tokens(ToyTokenizer(), infilling=False) == {2}
    assert stop_tokens(ToyTokenizer(), infilling=True) == {2, 6}
    assert stop_tokens(ToyWithoutInfilling(), infilling=False) == {2}
    with pytest.raises(ValueError, match="▁<EOT>"):
        stop_tokens(ToyWithoutInfilling(), infilling=True)


def test_missing_sentencepiece_message(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_sentencepiece(name, *args, **kwargs):
        if name == "sentencepiece" or name.startswith("sentencepiece."):
            raise ImportError("No module named 'sentencepiece'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sentencepiece)
    with pytest.raises(ImportError, match="pip install sentencepiece"):
        CodeLlamaTokenizer("tokenizer.model")


# A tiny SentencePiece model --------------------------------------------------

INFILLING = ["▁<PRE>", "▁<MID>", "▁<SUF>", "▁<EOT>"]

CORPUS = '''def fibonacci(n):
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)

def remove_non_ascii(s: str) -> str:
    """Remove non-ASCII characters from a string."""
    return "".join(c for c in s if ord(c) < 128)

class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def pop(self):
        return self.items.pop()

x = [i * 2 for i in range(10)]
print(x, 'hello world')
'''


def train(directory, user_defined_symbols):
    spm = pytest.importorskip("sentencepiece")
    corpus = directory / "corpus.txt"
    corpus.write_text(CORPUS * 4, encoding="utf-8")
    # Llama's tokenizer settings: BPE with byte fallback, digits split, text
    # not normalised, unk/bos/eos = 0/1/2 and no pad. Byte fallback takes 256
    # ids, hence a vocabulary of 400 rather than a hundred or two.
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(directory / "tok"), vocab_size=400, model_type="bpe",
        character_coverage=1.0, byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, user_defined_symbols=user_defined_symbols,
        minloglevel=2)
    return directory / "tok.model"


@pytest.fixture(scope="module")
def sp_model_path(tmp_path_factory):
    # "☺" as a piece of its own, as in Llama's vocabulary, so it encodes as
    # ["▁", "☺"] and Meta's hard-coded [2:] applies.
    return train(tmp_path_factory.mktemp("sp"), INFILLING + ["☺"])


@pytest.fixture(scope="module")
def tok(sp_model_path):
    return CodeLlamaTokenizer(sp_model_path)


TEXTS = ["def f(x):\n    return x", " return x", "\n    return y\n", "  print('hello world')", "x", "", "é ☺ 7"]


def test_special_ids(tok):
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, -1)
    ids = [tok.prefix_id, tok.middle_id, tok.suffix_id, tok.eot_id]
    assert [tok.id_to_piece(i) for i in ids] == INFILLING
    assert tok.vocab_size == 400 and tok.has_infilling


def test_without_infilling_tokens(tmp_path):
    tok = CodeLlamaTokenizer(train(tmp_path, []))
    assert (tok.prefix_id, tok.middle_id, tok.suffix_id, tok.eot_id) == (None,) * 4
    assert not tok.has_infilling
    with pytest.raises(ValueError, match="▁<PRE>"):
        infilling_prompt(tok, "a", "b")
    assert stop_tokens(tok, infilling=False) == {tok.eos_id}


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_round_trip(tok, text):
    ids = tok.encode(text, bos=False, eos=False)
    assert ids == tok.sp_model.encode(text)
    assert tok.encode(text) == [tok.bos_id] + ids
    assert tok.encode(text, bos=True, eos=True) == [tok.bos_id] + ids + [tok.eos_id]
    assert tok.decode(ids) == text
    # bos / eos and Llama's pad id -1 do not show in the text.
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id, -1, -1]) == text


@pytest.mark.parametrize("text", TEXTS)
def test_encode_infilling(tok, text):
    ids = tok.encode_infilling(text)
    # Meta's formula, which holds when the sentinel is ["▁", "☺"].
    assert ids == tok.sp_model.encode("☺" + text)[2:]
    assert tok.decode_infilling(ids) == text
    if text and not text[0].isspace():
        # The implicit leading space is gone: encode's first piece has it, this one does not.
        assert tok.id_to_piece(tok.encode(text, bos=False)[0]).startswith("▁")
        assert not tok.id_to_piece(ids[0]).startswith("▁")


def test_encode_infilling_drops_leading_space_token(tok):
    # " return x" encodes with the dummy prefix as ["▁▁", "return", ...]; without, as ["▁", "return", ...].
    with_space = [tok.id_to_piece(i) for i in tok.encode(" return x", bos=False)]
    without = [tok.id_to_piece(i) for i in tok.encode_infilling(" return x")]
    assert with_space[0] == "▁▁" and without[0] == "▁"
    assert with_space[1:] == without[1:]
    # Plain decode would lose the leading space of an infill; decode_infilling keeps it.
    assert tok.decode(tok.encode_infilling(" return x")) == "return x"
    assert tok.decode_infilling(tok.encode_infilling(" return x")) == " return x"


def test_sentinel_by_byte_fallback(tmp_path):
    # Without "☺" in the vocabulary it is three byte pieces; a fixed [2:] would
    # leave two of them in front of the text.
    tok = CodeLlamaTokenizer(train(tmp_path, INFILLING))
    sentinel = [tok.id_to_piece(i) for i in tok.sp_model.encode("☺")]
    assert sentinel == ["▁", "<0xE2>", "<0x98>", "<0xBA>"]
    for text in TEXTS:
        ids = tok.encode_infilling(text)
        assert ids == tok.sp_model.encode("☺" + text)[4:]
        assert tok.decode_infilling(ids) == text


@pytest.mark.parametrize("suffix_first", [False, True])
def test_infilling_prompt(tok, suffix_first):
    prefix, suffix = "def f(x):\n    ", "\n    return y\n"
    pre = tok.sp_model.encode(prefix)
    suf = tok.sp_model.encode("☺" + suffix)[2:]
    if suffix_first:
        expected = [tok.bos_id, tok.prefix_id, tok.suffix_id] + suf + [tok.middle_id] + pre
    else:
        expected = [tok.bos_id, tok.prefix_id] + pre + [tok.suffix_id] + suf + [tok.middle_id]
    assert infilling_prompt(tok, prefix, suffix, suffix_first=suffix_first) == expected
    # The psm prompt is the template text "<PRE> {pre} <SUF>{suf} <MID>"; the infilling pieces carry the spaces.
    if not suffix_first:
        assert tok.decode(expected) == f"<PRE> {prefix} <SUF>{suffix} <MID>"
    assert stop_tokens(tok, infilling=True) == {tok.eos_id, tok.eot_id}


def test_type_and_path_errors(tok, tmp_path):
    with pytest.raises(TypeError):
        tok.encode(b"bytes")
    with pytest.raises(TypeError):
        tok.encode_infilling(None)
    with pytest.raises(FileNotFoundError):
        CodeLlamaTokenizer(tmp_path / "missing.model")
