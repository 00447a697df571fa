"""Code Llama's SentencePiece tokenizer and its infilling prompt formats.

    tok = CodeLlamaTokenizer("CodeLlama-7b/tokenizer.model")
    ids = tok.encode("def f(x):")                       # [bos, ...]
    prompt = infilling_prompt(tok, prefix, suffix)       # prefix-suffix-middle
    stops = stop_tokens(tok, infilling=True)             # {eos, eot}
    text = tok.decode_infilling(generated_ids_before_the_stop_token)

This follows Meta's reference code (``llama/tokenizer.py`` and
``infilling_prompt_tokens`` in ``llama/generation.py`` of meta-llama/codellama):

* bos / eos / pad come from the SentencePiece model (Llama's pad id is -1,
  i.e. undefined, which is why ``decode`` drops -1s).
* The infilling tokens are looked up by piece: ``▁<PRE>``, ``▁<MID>``,
  ``▁<SUF>``, ``▁<EOT>`` (ids 32007, 32009, 32008, 32010 in the 32,016-token
  vocabulary of Code Llama 7B/13B/70B and their Instruct variants). The Python
  variants and the 34B models have a 32,000-token vocabulary without them, and
  their ids are None here.
* SentencePiece prepends a space ("▁") to every text it encodes. The suffix of
  an infilling prompt must not get one: the ``▁<SUF>`` piece already carries
  the space of the template "<PRE> {pre} <SUF>{suf} <MID>". Meta removes it by
  encoding a sentinel character in front of the text and dropping the tokens
  the sentinel became; ``decode_infilling`` is the inverse.

Prompt building only needs bos_id, the infilling ids, ``encode`` and
``encode_infilling``, so ``infilling_prompt`` and ``stop_tokens`` accept any
object with that interface (tests use a character-level toy).
"""

from __future__ import annotations

import os
from typing import Iterable

# Meta's sentinel for removing SentencePiece's implicit leading space. Any
# character works as long as nothing in the text can merge with it. Meta's
# hard-coded [2:] assumes Llama's vocabulary encodes it as two ids, ["▁", "☺"].
_SENTINEL = "☺"

# Piece names of the infilling tokens, by the attribute that holds their id.
INFILLING_PIECES = {
    "prefix_id": "▁<PRE>",
    "middle_id": "▁<MID>",
    "suffix_id": "▁<SUF>",
    "eot_id": "▁<EOT>",
}


class CodeLlamaTokenizer:
    """A SentencePiece model with Code Llama's special and infilling token ids.

    Attributes: ``bos_id``, ``eos_id``, ``pad_id`` (-1 when the model defines
    none, as in Llama's), ``prefix_id``, ``middle_id``, ``suffix_id``,
    ``eot_id`` (None when the vocabulary lacks the piece) and ``vocab_size``.
    """

    def __init__(self, model_path: str | os.PathLike):
        try:
            # Imported here so the kernels never need sentencepiece.
            from sentencepiece import SentencePieceProcessor
        except ImportError as exc:
            raise ImportError(
                "CodeLlamaTokenizer needs the sentencepiece package: pip install sentencepiece"
            ) from exc
        model_path = os.fspath(model_path)
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"no SentencePiece model at {model_path!r}")

        self.sp_model = SentencePieceProcessor(model_file=model_path)
        self.vocab_size: int = self.sp_model.vocab_size()
        self.bos_id: int = self.sp_model.bos_id()
        self.eos_id: int = self.sp_model.eos_id()
        self.pad_id: int = self.sp_model.pad_id()

        self.prefix_id: int | None = self._piece_id(INFILLING_PIECES["prefix_id"])
        self.middle_id: int | None = self._piece_id(INFILLING_PIECES["middle_id"])
        self.suffix_id: int | None = self._piece_id(INFILLING_PIECES["suffix_id"])
        self.eot_id: int | None = self._piece_id(INFILLING_PIECES["eot_id"])

        # What the sentinel encodes to, dummy-prefix "▁" included: two ids for
        # Llama's vocabulary (Meta's hard-coded [2:]). Measuring it keeps
        # encode_infilling right for vocabularies where the sentinel is one
        # merged piece or falls back to bytes.
        self._sentinel_ids: list[int] = self.sp_model.encode(_SENTINEL)

    def _piece_id(self, piece: str) -> int | None:
        # piece_to_id returns the unk id for an unknown piece. Meta writes
        # `piece_to_id(p) or None`, which relies on unk being id 0; comparing
        # the piece back does not.
        token = self.sp_model.piece_to_id(piece)
        return token if self.sp_model.id_to_piece(token) == piece else None

    @property
    def has_infilling(self) -> bool:
        """Whether the vocabulary has all four infilling tokens."""
        return None not in (self.prefix_id, self.middle_id, self.suffix_id, self.eot_id)

    def encode(self, s: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of ``s`` (with SentencePiece's leading space), optionally framed by bos / eos."""
        _check_str(s)
        ids = self.sp_model.encode(s)
        if bos:
            ids = [self.bos_id] + ids
        if eos:
            ids = ids + [self.eos_id]
        return ids

    def encode_infilling(self, s: str) -> list[int]:
        """Token ids of ``s`` without the implicit leading space (no bos / eos)."""
        _check_str(s)
        ids = self.sp_model.encode(_SENTINEL + s)
        n = len(self._sentinel_ids)
        if ids[:n] != self._sentinel_ids:
            # The sentinel merged with the start of s; dropping a fixed count
            # (as Meta does) would silently eat part of s.
            raise ValueError(f"cannot encode {s[:20]!r} without its leading space: "
                             f"{_SENTINEL!r} merges with its first characters in this vocabulary")
        return ids[n:]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; -1 (Llama's undefined pad id) is skipped."""
        return self.sp_model.decode([int(t) for t in ids if t != -1])

    def decode_infilling(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` keeping a leading space, the inverse of ``encode_infilling``.

        SentencePiece drops the space of the first piece when decoding, which
        would eat the space an infill starts with. Decoding after the sentinel
        keeps it; the sentinel is then cut off the text.
        """
        text = self.decode(self._sentinel_ids + [int(t) for t in ids])
        # The sentinel decodes to exactly itself: its own leading "▁" is the
        # one SentencePiece drops.
        assert text.startswith(_SENTINEL), text
        return text[len(_SENTINEL):]

    def id_to_piece(self, token: int) -> str:
        return self.sp_model.id_to_piece(int(token))

    def __repr__(self) -> str:
        return (f"CodeLlamaTokenizer(vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id}, "
                f"pre={self.prefix_id}, mid={self.middle_id}, suf={self.suffix_id}, eot={self.eot_id})")


def _check_str(s) -> None:
    if not isinstance(s, str):
        raise TypeError(f"expected a str, got {type(s).__name__}")


def _require_ids(tokenizer, attrs: Iterable[str]) -> None:
    missing = [INFILLING_PIECES[a] for a in attrs if getattr(tokenizer, a, None) is None]
    if missing:
        raise ValueError(
            f"the tokenizer has no infilling token {', '.join(missing)}: infilling needs a Code Llama "
            "vocabulary with 32,016 tokens (the Python and 34B variants have 32,000 and cannot infill)")


def infilling_prompt(tokenizer, prefix: str, suffix: str, suffix_first: bool = False) -> list[int]:
    """Prompt ids asking the model for the text between ``prefix`` and ``suffix``.

    prefix-suffix-middle (default), "<PRE> {prefix} <SUF>{suffix} <MID>":
        [bos, PRE] + encode(prefix) + [SUF] + encode_infilling(suffix) + [MID]
    suffix-prefix-middle (``suffix_first=True``), "<PRE> <SUF>{suffix} <MID> {prefix}":
        [bos, PRE, SUF] + encode_infilling(suffix) + [MID] + encode(prefix)

    The prefix keeps SentencePiece's leading space and the suffix does not,
    as in Meta's ``infilling_prompt_tokens``. The model then writes the middle
    and ends it with EOT (see ``stop_tokens``).
    """
    _require_ids(tokenizer, ("prefix_id", "suffix_id", "middle_id"))
    pre = tokenizer.encode(prefix, bos=False, eos=False)
    suf = tokenizer.encode_infilling(suffix)
    if suffix_first:
        return [tokenizer.bos_id, tokenizer.prefix_id, tokenizer.suffix_id] + suf + [tokenizer.middle_id] + pre
    return [tokenizer.bos_id, tokenizer.prefix_id] + pre + [tokenizer.suffix_id] + suf + [tokenizer.middle_id]


def stop_tokens(tokenizer, infilling: bool) -> set[int]:
    """Ids that end a generation: eos, plus EOT when infilling.

    Meta's ``text_infilling`` stops at EOT only; eos is kept here too so an
    infill that ends with eos does not run on to the length limit.
    """
    stops = {tokenizer.eos_id}
    if infilling:
        _require_ids(tokenizer, ("eot_id",))
        stops.add(tokenizer.eot_id)
    return stops
