"""The ESM-2 alphabet: 33 tokens in ESM order, encoding, decoding and padded batch encoding.

Token ids equal ``transformers.EsmTokenizer``'s on the same vocabulary for every string made of
vocabulary characters and inline special tokens (``"MK<mask>T"``). One deliberate difference: an
unknown character becomes one ``<unk>`` each (``EsmTokenizer`` merges a run of unknown characters
into a single ``<unk>``), so token positions stay aligned with residues.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import numpy as np
import torch

TOKENS: tuple[str, ...] = (
    "<cls>", "<pad>", "<eos>", "<unk>",
    "L", "A", "G", "V", "S", "E", "R", "T", "I", "D", "P", "K", "Q", "N", "F", "Y", "M", "H",
    "W", "C", "X", "B", "U", "Z", "O", ".", "-",
    "<null_1>", "<mask>",
)  # fmt: skip

CLS, PAD, EOS, UNK = 0, 1, 2, 3
NULL_1, MASK = 31, 32
VOCAB_SIZE = len(TOKENS)
SPECIAL_IDS = frozenset({CLS, PAD, EOS, UNK, NULL_1, MASK})
#: The label of a token the MLM loss does not score (PyTorch's and HF's convention).
IGNORE_INDEX = -100
#: Ids of the 20 standard amino acids (what the MLM "random residue" replacement draws from).
STANDARD_AA = "LAGVSERTIDPKQNFYMHWC"
STANDARD_AA_IDS: tuple[int, ...] = tuple(TOKENS.index(a) for a in STANDARD_AA)
#: Single characters that are tokens (residues, ambiguity codes, gap symbols).
RESIDUE_CHARS = frozenset(t for t in TOKENS if len(t) == 1)

_TOKEN_TO_ID = {t: i for i, t in enumerate(TOKENS)}
_SPECIAL_RE = re.compile("|".join(re.escape(t) for t in TOKENS if len(t) > 1))
# Byte -> id lookup for the fast path; -1 = whitespace (dropped), UNK otherwise.
_BYTE_TABLE = np.full(256, UNK, dtype=np.int64)
for _ch in RESIDUE_CHARS:
    _BYTE_TABLE[ord(_ch)] = _TOKEN_TO_ID[_ch]
for _ch in " \t\n\r\v\f":
    _BYTE_TABLE[ord(_ch)] = -1


def token_to_id(token: str) -> int:
    """The id of one token (``<unk>``'s id for anything outside the vocabulary)."""
    return _TOKEN_TO_ID.get(token, UNK)


def _encode_plain(text: str) -> np.ndarray:
    """Encode text without inline special tokens: one id per non-whitespace character."""
    try:
        raw = np.frombuffer(text.encode("ascii"), dtype=np.uint8)
    except UnicodeEncodeError:
        ids = [(-1 if ch.isspace() else _TOKEN_TO_ID.get(ch, UNK)) for ch in text]
        arr = np.asarray(ids, dtype=np.int64)
    else:
        arr = _BYTE_TABLE[raw]
    return arr[arr >= 0]


def encode(sequence: str, add_special_tokens: bool = True) -> list[int]:
    """Token ids of one sequence, wrapped as ``<cls> ... <eos>`` by default.

    Whitespace is ignored; ``<mask>`` and the other special tokens may appear inline.
    """
    if "<" in sequence:
        parts: list[np.ndarray] = []
        pos = 0
        for match in _SPECIAL_RE.finditer(sequence):
            parts.append(_encode_plain(sequence[pos : match.start()]))
            parts.append(np.asarray([_TOKEN_TO_ID[match.group()]], dtype=np.int64))
            pos = match.end()
        parts.append(_encode_plain(sequence[pos:]))
        ids = np.concatenate(parts)
    else:
        ids = _encode_plain(sequence)
    out = ids.tolist()
    return [CLS, *out, EOS] if add_special_tokens else out


def decode(ids: Iterable[int], skip_special_tokens: bool = False) -> str:
    """The string of token ids (no separators); optionally without ``<cls>/<eos>/<pad>``."""
    skip = {CLS, EOS, PAD} if skip_special_tokens else set()
    return "".join(TOKENS[int(i)] for i in ids if int(i) not in skip)


def pad_token_lists(
    token_lists: Sequence[Sequence[int]], pad_to_multiple_of: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists into ``(input_ids, attention_mask)``, both ``[B, T]`` int64."""
    if not token_lists:
        raise ValueError("cannot pad an empty batch")
    longest = max(len(t) for t in token_lists)
    if pad_to_multiple_of:
        longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(token_lists), longest), PAD, dtype=torch.long)
    attention_mask = torch.zeros((len(token_lists), longest), dtype=torch.long)
    for row, toks in enumerate(token_lists):
        input_ids[row, : len(toks)] = torch.as_tensor(toks, dtype=torch.long)
        attention_mask[row, : len(toks)] = 1
    return input_ids, attention_mask


def batch_encode(
    sequences: Sequence[str],
    add_special_tokens: bool = True,
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """Encode and right-pad sequences: ``{"input_ids", "attention_mask"}``, each ``[B, T]``."""
    input_ids, attention_mask = pad_token_lists(
        [encode(s, add_special_tokens) for s in sequences], pad_to_multiple_of
    )
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def vocab_text() -> str:
    """The ``vocab.txt`` of ``EsmTokenizer``: one token a line, in id order."""
    return "\n".join(TOKENS) + "\n"
