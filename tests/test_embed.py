"""Embeddings to zarr: values equal the model's and HF EsmModel's hidden states."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from transformers import EsmConfig, EsmForMaskedLM

from pipeline.errors import InputFormatError
from pipeline.records import read_sequences
from tests.helpers import real_records, shared_file
from training import alphabet
from training.cli import main
from training.data.reference_sequences import REFERENCE_SEQUENCES
from training.embed import EmbedError, EmbedOptions, embed_fasta, resolve_layers, window_starts
from training.model.checkpoint import load_checkpoint
from training.model.convert import import_hf


def write_fasta(path: Path, records: list[tuple[str, str]], gz: bool = False) -> Path:
    text = "".join(
        f">{rid} description\n" + "".join(seq[i : i + 60] + "\n" for i in range(0, len(seq), 60))
        for rid, seq in records
    )
    if gz:
        with gzip.open(path, "wt") as handle:
            handle.write(text)
    else:
        path.write_text(text)
    return path


@pytest.fixture(scope="module")
def hf_and_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """A random EsmForMaskedLM (2 layers), its directory, and our checkpoint imported from it."""
    root = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    hf = EsmForMaskedLM(
        EsmConfig(
            vocab_size=33, mask_token_id=32, pad_token_id=1, hidden_size=64,
            num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
            position_embedding_type="rotary", token_dropout=True, emb_layer_norm_before=False,
            layer_norm_eps=1e-5, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )
    )  # fmt: skip
    with torch.no_grad():
        for param in hf.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    hf.eval().save_pretrained(root / "hf")
    return hf, root / "hf", import_hf(root / "hf", root / "ckpt")


def direct_hidden(model, sequence: str, layer: int) -> np.ndarray:
    """Hidden states of one sequence run alone (padded path), without <cls>/<eos>."""
    ids = torch.tensor([alphabet.encode(sequence)])
    with torch.no_grad():
        return model.hidden_states(ids, [layer])[layer][0, 1:-1].numpy()


def hf_hidden(hf: EsmForMaskedLM, sequence: str, layer: int) -> np.ndarray:
    batch = alphabet.batch_encode([sequence])
    with torch.no_grad():
        out = hf.esm(**batch, output_hidden_states=True)
    states = out.last_hidden_state if layer == hf.config.num_hidden_layers else None
    if states is None:
        states = out.hidden_states[layer]
    return states[0, 1:-1].numpy()


def test_store_values_equal_model_and_hf_hidden_states(tmp_path: Path, hf_and_checkpoint) -> None:
    hf, _, checkpoint = hf_and_checkpoint
    records = real_records(8, 260)
    fasta = write_fasta(tmp_path / "in.fasta.gz", records, gz=True)
    model = load_checkpoint(checkpoint)
    # Small batches and blocks: several batches per block, several blocks per file.
    options = EmbedOptions(
        layers=[-1, 0, 1], tokens_per_batch=600, block_bytes=64 * 4 * 500, progress=False
    )
    summary = embed_fasta(model, fasta, tmp_path / "out.zarr", options)
    assert summary.layers == [2, 0, 1] and summary.num_sequences == len(records)
    store = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")
    assert list(store["ids"][:]) == [rid for rid, _ in records]
    lengths = [len(seq) for _, seq in records]
    assert store["lengths"][:].tolist() == lengths
    assert store["offsets"][:].tolist() == [0, *np.cumsum(lengths).tolist()]
    assert store.attrs["layers"] == [2, 0, 1] and store.attrs["truncated_sequences"] == 0
    assert store.attrs["model"]["hidden_size"] == 64
    offsets = store["offsets"][:]
    for layer in (2, 0, 1):
        per_residue = store[f"layer_{layer}/per_residue"]
        assert per_residue.shape == (sum(lengths), 64) and per_residue.dtype == np.float32
        assert per_residue.compressors  # compressed
        means = store[f"layer_{layer}/mean"][:]
        for i, (_, seq) in enumerate(records):
            got = per_residue[offsets[i] : offsets[i + 1]]
            np.testing.assert_allclose(got, direct_hidden(model, seq, layer), atol=1e-5, rtol=0)
            np.testing.assert_allclose(got, hf_hidden(hf, seq, layer), atol=1e-5, rtol=0)
            np.testing.assert_allclose(means[i], got.mean(0), atol=1e-6, rtol=0)
    assert {p.name for p in tmp_path.iterdir()} == {"in.fasta.gz", "out.zarr"}  # no temp left


def test_long_sequences_are_truncated_or_windowed(tmp_path: Path, hf_and_checkpoint) -> None:
    _, _, checkpoint = hf_and_checkpoint
    model = load_checkpoint(checkpoint)
    records = [("short", real_records(1, 50, min_len=50)[0][1]),
               ("long", real_records(1, 150, min_len=150)[0][1])]
    assert len(records[1][1]) == 150
    fasta = write_fasta(tmp_path / "in.fasta", records)

    truncated = embed_fasta(
        model, fasta, tmp_path / "t.zarr", EmbedOptions(max_residues=60, progress=False)
    )
    assert truncated.truncated == 1 and truncated.total_residues == 50 + 60
    store = zarr.open_group(str(tmp_path / "t.zarr"), mode="r")
    assert store.attrs["truncated_sequences"] == 1
    assert store["lengths"][:].tolist() == [50, 150] and store["offsets"][:].tolist() == [
        0,
        50,
        110,
    ]
    np.testing.assert_allclose(
        store["layer_2/per_residue"][50:110],
        direct_hidden(model, records[1][1][:60], 2),
        atol=1e-5,
        rtol=0,
    )

    options = EmbedOptions(max_residues=60, window=40, window_overlap=10, progress=False)
    windowed = embed_fasta(model, fasta, tmp_path / "w.zarr", options)
    assert windowed.windowed == 1 and windowed.truncated == 0
    starts = window_starts(150, 40, 10)
    assert starts == [0, 30, 60, 90, 110]
    total = np.zeros((150, 64))
    count = np.zeros(150)
    for start in starts:
        total[start : start + 40] += direct_hidden(model, records[1][1][start : start + 40], 2)
        count[start : start + 40] += 1
    store = zarr.open_group(str(tmp_path / "w.zarr"), mode="r")
    np.testing.assert_allclose(
        store["layer_2/per_residue"][50:200], total / count[:, None], atol=1e-5, rtol=0
    )
    np.testing.assert_allclose(
        store["layer_2/mean"][1], (total / count[:, None]).mean(0), atol=1e-5, rtol=0
    )
    assert store.attrs["window"] == 40 and store.attrs["windowed_sequences"] == 1


def test_default_limit_is_1022_residues(tmp_path: Path, hf_and_checkpoint) -> None:
    _, _, checkpoint = hf_and_checkpoint
    model = load_checkpoint(checkpoint)
    header, sequence = REFERENCE_SEQUENCES[-1]
    assert len(sequence) == 1172
    fasta = write_fasta(tmp_path / "in.fasta", [(header.split()[0], sequence)])
    summary = embed_fasta(model, fasta, tmp_path / "o.zarr", EmbedOptions(progress=False))
    assert summary.truncated == 1 and summary.total_residues == 1022
    store = zarr.open_group(str(tmp_path / "o.zarr"), mode="r")
    assert store["lengths"][:].tolist() == [1172]  # the input's length ...
    assert store["embedded_lengths"][:].tolist() == [1022]  # ... and the rows stored for it
    np.testing.assert_allclose(
        store["layer_2/per_residue"][:], direct_hidden(model, sequence[:1022], 2), atol=1e-5
    )


def test_cli_warns_once_beyond_the_trained_positions(tmp_path: Path, hf_and_checkpoint,
                                                     capsys) -> None:
    _, _, checkpoint = hf_and_checkpoint
    fasta = write_fasta(tmp_path / "in.fasta", real_records(2, 120))
    args = ["embed", "--checkpoint", str(checkpoint), "--fasta", str(fasta), "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "a.zarr"), "--max-residues", "5000"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "--max-residues 5000" in warnings[0] and "1024" in warnings[0]
    assert main([*args, "--out", str(tmp_path / "b.zarr")]) == 0
    assert "warning" not in capsys.readouterr().err


def test_cli_embed_from_hf_directory_and_errors(tmp_path: Path, hf_and_checkpoint, capsys) -> None:
    _, hf_dir, checkpoint = hf_and_checkpoint
    fasta = write_fasta(tmp_path / "in.fasta", real_records(4, 120))
    common = ["--fasta", str(fasta), "--layers", "-1", "1", "--no-progress", "--threads", "2"]
    assert (
        main(["embed", "--checkpoint", str(hf_dir), "--out", str(tmp_path / "a.zarr"), *common])
        == 0
    )
    assert (
        main(["embed", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "b.zarr"), *common])
        == 0
    )
    assert "4 sequences" in capsys.readouterr().out
    a = zarr.open_group(str(tmp_path / "a.zarr"), mode="r")
    b = zarr.open_group(str(tmp_path / "b.zarr"), mode="r")
    for name in ("layer_2/per_residue", "layer_1/mean"):
        np.testing.assert_array_equal(a[name][:], b[name][:])

    failures = [
        (["--checkpoint", str(checkpoint), "--out", str(tmp_path / "a.zarr"), *common], "exists"),
        (
            ["--checkpoint", str(checkpoint), "--out", str(tmp_path / "c.zarr"), "--fasta",
             str(fasta), "--layers", "3"],
            "layer 3 does not exist",
        ),
        (
            ["--checkpoint", str(checkpoint), "--out", str(tmp_path / "c.zarr"), "--fasta",
             str(tmp_path / "missing.fasta")],
            "missing.fasta: no such file",
        ),
        (
            ["--checkpoint", str(tmp_path), "--out", str(tmp_path / "c.zarr"), "--fasta",
             str(fasta)],
            "has no config.json",
        ),
        (
            ["--checkpoint", str(checkpoint), "--out", str(tmp_path / "c.zarr"), "--fasta",
             str(fasta), "--window", "2000"],
            "window must be between 1 and 1022",
        ),
    ]  # fmt: skip
    for args, message in failures:
        assert main(["embed", *args]) == 1
        err = capsys.readouterr().err
        assert err.startswith("esm2-train: error: ") and message in err, err
        assert err.count("\n") == 1
    assert not (tmp_path / "c.zarr").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.zarr", "b.zarr", "in.fasta"]


def test_bad_input_leaves_no_store(tmp_path: Path, hf_and_checkpoint) -> None:
    _, _, checkpoint = hf_and_checkpoint
    model = load_checkpoint(checkpoint)
    (tmp_path / "bad.fasta").write_text(">a\nMKT\n>b\nMK!T\n")
    with pytest.raises(InputFormatError, match=r"bad\.fasta: record b \(line 3\)"):
        embed_fasta(model, tmp_path / "bad.fasta", tmp_path / "o.zarr")
    (tmp_path / "empty.fasta").write_text("")
    with pytest.raises(InputFormatError, match="no FASTA records"):
        embed_fasta(model, tmp_path / "empty.fasta", tmp_path / "o.zarr")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.fasta", "empty.fasta"]


def test_layer_and_window_helpers() -> None:
    assert resolve_layers([-1, 0, 2, -3], 2) == [2, 0]
    with pytest.raises(EmbedError, match=r"layers 0\.\.2 \(or -3\.\.-1\)"):
        resolve_layers([-4], 2)
    assert window_starts(10, 20, 5) == [0]
    assert window_starts(100, 40, 0) == [0, 40, 60]
    with pytest.raises(EmbedError, match="needs a window"):
        embed_fasta(None, "x", "y", EmbedOptions(window_overlap=10))  # type: ignore[arg-type]
    with pytest.raises(EmbedError, match="overlap"):
        embed_fasta(None, "x", "y", EmbedOptions(window=10, window_overlap=10))  # type: ignore[arg-type]


def test_embed_a_real_fasta_file(tmp_path: Path, hf_and_checkpoint) -> None:
    path = shared_file("openfold_msa_uniref90_hits.fasta.gz")
    hf, _, checkpoint = hf_and_checkpoint
    model = load_checkpoint(checkpoint)
    summary = embed_fasta(model, path, tmp_path / "o.zarr", EmbedOptions(progress=False))
    assert (summary.num_sequences, summary.total_residues) == (1293, 88437)  # data README
    store = zarr.open_group(str(tmp_path / "o.zarr"), mode="r")
    records = list(read_sequences(path))
    offsets = store["offsets"][:]
    for i in (0, 500, 1292):
        got = store["layer_2/per_residue"][offsets[i] : offsets[i + 1]]
        np.testing.assert_allclose(got, hf_hidden(hf, records[i][1], 2), atol=1e-5, rtol=0)
    assert store["ids"][0] == records[0][0]
