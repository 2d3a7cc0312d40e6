"""The ESM alphabet: order, encoding, padding, and parity with transformers.EsmTokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.records import read_sequences
from tests.helpers import real_sequences, shared_file
from training import alphabet

ESM_ORDER = [
    "<cls>", "<pad>", "<eos>", "<unk>",
    "L", "A", "G", "V", "S", "E", "R", "T", "I", "D", "P", "K", "Q", "N", "F", "Y", "M", "H",
    "W", "C", "X", "B", "U", "Z", "O", ".", "-",
    "<null_1>", "<mask>",
]  # fmt: skip


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    from transformers import EsmTokenizer

    vocab = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    vocab.write_text("\n".join(ESM_ORDER))
    return EsmTokenizer(str(vocab))


def test_tokens_are_the_33_esm_tokens_in_order() -> None:
    assert list(alphabet.TOKENS) == ESM_ORDER
    assert alphabet.VOCAB_SIZE == 33
    assert (alphabet.CLS, alphabet.PAD, alphabet.EOS, alphabet.UNK, alphabet.MASK) == (
        0,
        1,
        2,
        3,
        32,
    )
    assert alphabet.token_to_id("<null_1>") == 31
    assert alphabet.token_to_id("J") == alphabet.UNK
    assert len(alphabet.STANDARD_AA_IDS) == 20
    assert all(4 <= i <= 23 for i in alphabet.STANDARD_AA_IDS)


def test_ids_equal_esm_tokenizer_on_real_sequences(hf_tokenizer) -> None:
    for seq in real_sequences(max_len=2000):
        assert alphabet.encode(seq) == hf_tokenizer(seq)["input_ids"], seq[:30]


def test_ids_equal_esm_tokenizer_on_every_shared_query(hf_tokenizer) -> None:
    sequences = [seq for _, seq in read_sequences(shared_file("mmseqs2_examples_query.fasta.gz"))]
    assert len(sequences) >= 60
    for seq in sequences:
        assert alphabet.encode(seq) == hf_tokenizer(seq)["input_ids"], seq[:30]


@pytest.mark.parametrize(
    "text",
    [
        "MK<mask>TAYIA<mask>",
        "<cls>AC<eos>",
        "A C\tD\nE",
        "XBUZO.-<null_1>",
        "<mask><mask>",
        "<unk>L<pad>",
        "",
    ],
)
def test_ids_equal_esm_tokenizer_with_special_tokens_and_whitespace(hf_tokenizer, text) -> None:
    assert alphabet.encode(text) == hf_tokenizer(text)["input_ids"]
    assert (
        alphabet.encode(text, add_special_tokens=False)
        == hf_tokenizer(text, add_special_tokens=False)["input_ids"]
    )


def test_each_unknown_character_is_one_unk() -> None:
    # EsmTokenizer merges "JJ" into one <unk>; we keep one token per character (residue alignment).
    assert alphabet.encode("AJJb", add_special_tokens=False) == [5, 3, 3, 3]
    assert alphabet.encode("Aé", add_special_tokens=False) == [5, 3]


def test_decode_round_trip() -> None:
    seq = real_sequences(3)[0]
    ids = alphabet.encode(seq)
    assert alphabet.decode(ids) == "<cls>" + seq + "<eos>"
    assert alphabet.decode(ids, skip_special_tokens=True) == seq
    assert alphabet.decode([0, 5, 32, 2, 1, 1], skip_special_tokens=True) == "A<mask>"


def test_batch_encode_pads_right_with_mask() -> None:
    batch = alphabet.batch_encode(["MKT", "A", "ACDEF"])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == (3, 7) and ids.dtype == torch.long
    assert ids[0].tolist() == [0, 20, 15, 11, 2, 1, 1]
    assert ids[1].tolist() == [0, 5, 2, 1, 1, 1, 1]
    assert mask.sum(1).tolist() == [5, 3, 7]
    assert bool((ids[mask == 0] == alphabet.PAD).all())
    padded = alphabet.batch_encode(["MKT", "A"], pad_to_multiple_of=8)["input_ids"]
    assert padded.shape == (2, 8)


def test_batch_encode_matches_tokenizer_padding(hf_tokenizer) -> None:
    sequences = real_sequences(6)
    ours = alphabet.batch_encode(sequences)
    theirs = hf_tokenizer(sequences, padding=True, return_tensors="pt")
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert torch.equal(ours["attention_mask"], theirs["attention_mask"])


def test_empty_batch_is_an_error() -> None:
    with pytest.raises(ValueError, match="empty batch"):
        alphabet.batch_encode([])


def test_vocab_text_builds_the_same_tokenizer(tmp_path: Path) -> None:
    from transformers import EsmTokenizer

    (tmp_path / "vocab.txt").write_text(alphabet.vocab_text())
    tokenizer = EsmTokenizer(str(tmp_path / "vocab.txt"))
    assert tokenizer.convert_ids_to_tokens(list(range(33))) == ESM_ORDER
    assert tokenizer.mask_token_id == alphabet.MASK and tokenizer.pad_token_id == alphabet.PAD
