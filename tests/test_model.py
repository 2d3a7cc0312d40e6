"""ESM2 model: presets, parameter counts, packed == padded, losses, checkpointing, TE backend."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import real_sequences
from training import alphabet
from training.model.config import PRESETS, ConfigError
from training.model.esm2 import ESM2, ModelConfig, build_model, count_parameters
from training.model.layout import build_layout, pack_token_lists, plan_buckets
from training.model.te_backend import (
    BackendUnavailableError,
    fp8_padding,
    rename_from_te,
    rename_to_te,
)


def random_model(seed: int = 0, **overrides) -> ESM2:
    """A tiny model with every parameter perturbed (biases, norms included), in eval mode."""
    torch.manual_seed(seed)
    model = build_model(ModelConfig.from_preset("tiny", **overrides))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


def with_masks(sequences: list[str], every: int = 7) -> list[list[int]]:
    """Token lists with some residues replaced by <mask> (exercises token dropout)."""
    out = []
    for i, seq in enumerate(sequences):
        toks = alphabet.encode(seq)
        for pos in range(1 + i % every, len(toks) - 1, every):
            toks[pos] = alphabet.MASK
        out.append(toks)
    return out


# ----------------------------------------------------------------------------- config


def test_presets_have_the_published_shapes() -> None:
    expected = {
        "8M": (6, 320, 20),
        "35M": (12, 480, 20),
        "150M": (30, 640, 20),
        "650M": (33, 1280, 20),
        "3B": (36, 2560, 40),
        "15B": (48, 5120, 40),
    }
    for name, shape in expected.items():
        cfg = ModelConfig.from_preset(name)
        assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads) == shape
        assert cfg.ffn_size == 4 * cfg.hidden_size
        assert cfg.token_dropout and not cfg.emb_layer_norm_before
        assert cfg.layer_norm_eps == 1e-5 and cfg.preset == name
    assert "tiny" in PRESETS


def test_config_overrides_round_trip_and_errors() -> None:
    cfg = ModelConfig.from_preset("8M", activation_checkpointing=True, hidden_dropout=0.1)
    assert cfg.activation_checkpointing and cfg.hidden_dropout == 0.1
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert ModelConfig.from_dict({"preset": "35M", "token_dropout": False}).num_layers == 12
    with pytest.raises(ConfigError, match="unknown model preset"):
        ModelConfig.from_preset("7M")
    with pytest.raises(ConfigError, match=r"unknown model config field\(s\) \['hiden_size'\]"):
        ModelConfig.from_preset("8M", hiden_size=10)
    with pytest.raises(ConfigError, match=r"not a multiple of model\.num_heads"):
        ModelConfig(hidden_size=100, num_heads=3)
    with pytest.raises(ConfigError, match=r"model\.backend must be one of"):
        ModelConfig(backend="jax")
    with pytest.raises(ConfigError, match=r"te_fp8 needs model\.backend: te"):
        ModelConfig(te_fp8=True)
    with pytest.raises(ConfigError, match="hidden_dropout must be in"):
        ModelConfig(hidden_dropout=1.5)
    with pytest.raises(ConfigError, match="hidden_size must be a positive integer, got 'big'"):
        ModelConfig.from_dict({"num_layers": 2, "hidden_size": "big", "num_heads": 2})


# ----------------------------------------------------------------------------- parameters


@pytest.mark.parametrize("preset", ["tiny", "8M", "35M", "150M", "650M", "3B", "15B"])
def test_parameter_count_equals_hf(preset: str) -> None:
    from transformers import EsmConfig, EsmForMaskedLM

    from training.model.convert import config_to_hf

    cfg = ModelConfig.from_preset(preset)
    device = "cpu" if preset in ("tiny", "8M", "35M") else "meta"
    with torch.device(device):
        hf = EsmForMaskedLM(EsmConfig(**config_to_hf(cfg)))
        ours = ESM2(cfg)
    assert count_parameters(ours) == hf.num_parameters() == count_parameters(hf)
    if preset == "8M":  # 6 x 1,232,960 (blocks) + 10,560 + 640 + 103,393 (LM head) + 121
        assert count_parameters(ours) == 7_512_474
    # Only the contact regression (layers x heads + 1) is not trained by MLM.
    frozen = cfg.num_layers * cfg.num_heads + 1
    assert count_parameters(ours, trainable_only=True) == count_parameters(ours) - frozen


def test_decoder_is_tied_and_left_out_of_the_state_dict() -> None:
    model = random_model()
    assert model.lm_head.decoder.weight is model.embed_tokens.weight
    state = model.state_dict()
    assert "lm_head.decoder.weight" not in state and "embed_tokens.weight" in state
    assert state["rotary.inv_freq"].dtype == torch.float32
    fresh = build_model(model.config)
    fresh.load_state_dict(state)  # strict: the tied key is not reported missing
    assert torch.equal(fresh.lm_head.decoder.weight, model.embed_tokens.weight)
    assert fresh.lm_head.decoder.weight is fresh.embed_tokens.weight


def test_rotary_frequencies_stay_float32_in_bf16() -> None:
    model = random_model().to(torch.bfloat16)
    assert model.rotary.inv_freq.dtype == torch.float32
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    head_dim = model.config.head_dim
    expected = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    assert torch.equal(model.rotary.inv_freq, expected)
    batch = alphabet.batch_encode(real_sequences(3, 50))
    logits = model(**batch)["logits"]
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


# ----------------------------------------------------------------------------- packed / padded


def test_packed_and_padded_give_the_same_logits_and_hidden_states() -> None:
    model = random_model()
    token_lists = with_masks(real_sequences(8))
    input_ids, attention_mask = alphabet.pad_token_lists(token_lists)
    with torch.no_grad():
        padded = model(input_ids, attention_mask=attention_mask, output_hidden_states=True)
    real = attention_mask.bool()
    for row_tokens in (None, 700):
        packed_ids, seq_ids = pack_token_lists(token_lists, row_tokens=row_tokens)
        assert (packed_ids.shape[0] > 1) == (row_tokens is not None)
        with torch.no_grad():
            packed = model(packed_ids, seq_ids=seq_ids, output_hidden_states=True)
        keep = seq_ids >= 0
        diff = (packed["logits"][keep] - padded["logits"][real]).abs().max()
        assert diff <= 1e-5, diff
        for ours, ref in zip(packed["hidden_states"], padded["hidden_states"], strict=True):
            assert (ours[keep] - ref[real]).abs().max() <= 1e-5
        assert bool((packed["logits"][~keep] == 0).all())  # padding gets zeros


def test_one_sequence_alone_equals_the_same_sequence_in_a_batch() -> None:
    model = random_model()
    token_lists = with_masks(real_sequences(6))
    ids, seq_ids = pack_token_lists(token_lists)
    with torch.no_grad():
        together = model(ids, seq_ids=seq_ids)["logits"][0]
        offset = 0
        for toks in token_lists:
            alone = model(torch.tensor([toks]))["logits"][0]
            part = together[offset : offset + len(toks)]
            assert (alone - part).abs().max() <= 1e-5
            offset += len(toks)


def test_attention_stays_within_each_packed_sequence() -> None:
    def pack(*token_lists: list[int]) -> tuple[torch.Tensor, None, torch.Tensor]:
        ids, seq_ids = pack_token_lists(list(token_lists))
        return ids, None, seq_ids

    model = random_model()
    first, second = (alphabet.encode(s) for s in real_sequences(2, 80))
    other = alphabet.encode(real_sequences(3, 120)[2])
    with torch.no_grad():
        a = model(*pack(first, second))["logits"]
        b = model(*pack(first, other))["logits"]
    # Changing the second sequence leaves the first one's logits unchanged (isolation), and the
    # first sequence's rotary positions start at 0 wherever it sits.
    assert torch.equal(a[0, : len(first)], b[0, : len(first)])
    with torch.no_grad():
        c = model(*pack(other, first))["logits"]
    assert (c[0, len(other) : len(other) + len(first)] - a[0, : len(first)]).abs().max() <= 1e-5


def test_token_dropout_uses_each_sequences_own_mask_ratio() -> None:
    model = random_model()
    seq = alphabet.encode(real_sequences(1, 40)[0])
    masked = list(seq)
    masked[3] = masked[9] = alphabet.MASK
    ids, seq_ids = pack_token_lists([seq, masked])
    layout = model.layout(ids, seq_ids=seq_ids)
    with torch.no_grad():
        emb = model.embed(ids, layout)
        raw = model.embed_tokens(torch.tensor(seq))
    n = len(seq)
    assert torch.allclose(emb[:n], raw * (1 - 0.12))  # no mask: scale (1 - 0.15 * 0.8)
    ratio = 2 / n
    expected = raw * (1 - 0.12) / (1 - ratio)
    expected[[3, 9]] = 0.0
    assert torch.allclose(emb[n:], expected, atol=1e-6)


def test_layout_describes_packed_rows() -> None:
    seq_ids = torch.tensor([[0, 0, 0, 1, 1, -1], [2, 2, 2, 2, -1, -1]])
    layout = build_layout(seq_ids=seq_ids, bucketed=False)
    assert layout.lengths.tolist() == [3, 2, 4]
    assert layout.cu_seqlens.tolist() == [0, 3, 5, 9]
    assert layout.positions.tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 3]
    assert layout.token_index.tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9]
    assert layout.max_seqlen == 4 and not layout.dense
    stream = torch.arange(9.0)
    back = layout.scatter(stream, fill=-1.0)
    assert back.tolist() == [[0, 1, 2, 3, 4, -1], [5, 6, 7, 8, -1, -1]]
    assert torch.equal(layout.gather(back), stream)
    bucketed = build_layout(seq_ids=seq_ids)
    assert bucketed.num_slots >= 9 and torch.equal(bucketed.gather(back), stream)
    assert torch.equal(bucketed.from_slots(bucketed.to_slots(back)), stream)
    dense = build_layout(torch.ones(2, 5, dtype=torch.long))
    assert dense.dense and dense.positions.tolist() == [0, 1, 2, 3, 4] * 2
    assert [(b.start, b.count, b.width, b.mask) for b in dense.buckets] == [(0, 2, 5, None)]


def test_layout_errors_are_clear() -> None:
    model = random_model()
    with pytest.raises(ValueError, match="input_ids must be"):
        model(torch.tensor([0, 5, 2]))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(torch.tensor([[0, 5, 2]]), attention_mask=torch.ones(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="pass packed ids as seq_ids="):
        model(*pack_token_lists([[0, 5, 2], [0, 6, 7, 2]], row_tokens=4))
    with pytest.raises(ValueError, match="no tokens"):
        model(torch.tensor([[1, 1]]), seq_ids=torch.tensor([[-1, -1]]))


def test_bucket_plan_is_optimal_for_small_batches() -> None:
    def cost(groups: list[list[int]], lengths: list[int]) -> int:
        longest = [max(lengths[i] for i in g) for g in groups]
        return sum(
            len(g) * w * (768 + w) + 64 * 64 * 8 for g, w in zip(groups, longest, strict=True)
        )

    rng = torch.Generator().manual_seed(0)
    for _ in range(60):
        n = int(torch.randint(1, 9, (1,), generator=rng))
        lengths = torch.randint(1, 600, (n,), generator=rng).tolist()
        plan = plan_buckets(lengths)
        assert sorted(i for g in plan for i in g) == list(range(n))
        order = sorted(range(n), key=lambda i: -lengths[i])
        best = min(
            cost([order[a:b] for a, b in itertools.pairwise([0, *cuts, n])], lengths)
            for k in range(min(6, n))
            for cuts in itertools.combinations(range(1, n), k)
        )
        assert cost(plan, lengths) == best


def test_unbucketed_layout_and_extra_padding_sequence_give_the_same_values() -> None:
    # The TransformerEngine layout (slots = real tokens, cu_seqlens) and its FP8 padding with a
    # dummy sequence, run through the PyTorch blocks, agree with the bucketed layout.
    model = random_model()
    ids, seq_ids = pack_token_lists([alphabet.encode(s) for s in real_sequences(5, 90)])
    bucketed = model.layout(ids, seq_ids=seq_ids)
    flat = build_layout(seq_ids=seq_ids, bucketed=False)
    extended = flat.with_extra_sequence(5)
    assert flat.num_slots == flat.num_tokens and not flat.buckets
    assert extended.cu_seqlens.tolist() == [*flat.cu_seqlens.tolist(), flat.num_tokens + 5]
    assert extended.positions[-5:].tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="unbucketed"):
        bucketed.with_extra_sequence(3)
    scale = model.config.head_dim**-0.5
    outputs = []
    with torch.no_grad():
        for layout, extra in ((bucketed, 0), (flat, 0), (extended, 5)):
            x = model.embed(ids, flat if extra else layout)
            x = torch.cat([x, torch.randn(extra, x.shape[1])])
            rope = model.rotary.tables(layout.positions, scale)
            for block in model.layers:
                x = block(x, rope, layout)
            outputs.append(layout.from_slots(x[: x.shape[0] - extra]))
    assert (outputs[0] - outputs[1]).abs().max() <= 1e-5
    assert (outputs[1] - outputs[2]).abs().max() <= 1e-5
    assert fp8_padding(model.config, 37) == 0
    fp8 = ModelConfig.from_preset("tiny", backend="te", te_fp8=True)
    assert [fp8_padding(fp8, t) for t in (16, 37, 48)] == [0, 11, 0]


def test_bucketed_slots_hold_each_sequence_contiguously() -> None:
    lengths = [5, 300, 290, 40, 38, 300]
    seq_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    layout = build_layout(seq_ids=seq_ids)
    assert sum(b.count for b in layout.buckets) == len(lengths)
    assert layout.num_slots >= layout.num_tokens
    assert (layout.buckets[0].count, layout.buckets[0].width) == (3, 300)
    values = torch.arange(layout.num_tokens, dtype=torch.float32)
    slots = layout.to_slots(values[None], fill=-1.0)
    assert torch.equal(layout.from_slots(slots), values)
    for bucket in layout.buckets:
        block = slots[bucket.start : bucket.start + bucket.count * bucket.width]
        block = block.view(bucket.count, bucket.width)
        real = block >= 0
        if bucket.mask is None:
            assert bool(real.all())
        else:
            assert torch.equal(bucket.mask[:, 0, 0], real)
        assert bool((block[:, 1:][real[:, 1:]] - block[:, :-1][real[:, 1:]] == 1).all())


# ----------------------------------------------------------------------------- training pieces


def test_forward_with_labels_gives_the_mlm_loss() -> None:
    """As HF's EsmForMaskedLM: labels in, the mean cross-entropy over the scored positions out
    (with its sum and count for a trainer); no scored position is a loss of 0 with zero grads."""
    model = random_model().train()
    batch = alphabet.batch_encode(real_sequences(2, 40))
    labels = torch.full(batch["input_ids"].shape, -100)
    labels[0, 1], labels[1, 3] = 7, 12
    out = model(**batch, labels=labels)
    logits = out["logits"]
    manual = -(F.log_softmax(logits[0, 1].float(), -1)[7]
               + F.log_softmax(logits[1, 3].float(), -1)[12]) / 2
    assert torch.allclose(out["loss"], manual)
    assert int(out["scored"]) == 2 and torch.allclose(out["nll"], 2 * manual)
    model.zero_grad()
    empty = model(**batch, labels=torch.full(labels.shape, -100))
    assert empty["loss"].item() == 0.0 and int(empty["scored"]) == 0
    (empty["loss"] + 0.0 * empty["logits"].sum()).backward()
    assert all(p.grad is None or bool((p.grad == 0).all()) for p in model.parameters())


def counting(forward, calls: list[bool], tag: bool):
    """Wrap a bound ``forward`` so that each call appends ``tag`` to ``calls``."""

    def wrapped(*args, **kwargs):
        calls.append(tag)
        return forward(*args, **kwargs)

    return wrapped


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    token_lists = with_masks(real_sequences(4, 60))
    ids, seq_ids = pack_token_lists(token_lists)
    labels = torch.where(ids == alphabet.MASK, torch.tensor(alphabet.token_to_id("A")), -100)
    labels[0, 5] = alphabet.token_to_id("L")
    grads = []
    calls: list[bool] = []
    for switch in (False, True):
        model = random_model(activation_checkpointing=switch).train()
        block = model.layers[0]
        block.forward = counting(block.forward, calls, switch)
        loss = model(ids, seq_ids=seq_ids, labels=labels)["loss"]
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name
    assert calls.count(False) == 1 and calls.count(True) == 2  # recomputed in backward


def test_dropout_only_in_training() -> None:
    model = random_model(hidden_dropout=0.2, attention_dropout=0.2)
    batch = alphabet.batch_encode(real_sequences(2, 40))
    with torch.no_grad():
        assert torch.equal(model(**batch)["logits"], model(**batch)["logits"])
        model.train()
        assert not torch.equal(model(**batch)["logits"], model(**batch)["logits"])


def test_hidden_states_of_chosen_layers() -> None:
    model = random_model()
    batch = alphabet.batch_encode(real_sequences(3, 50))
    with torch.no_grad():
        full = model(**batch, output_hidden_states=True)["hidden_states"]
        some = model.hidden_states(batch["input_ids"], [0, 2], batch["attention_mask"])
    assert len(full) == model.config.num_layers + 1
    assert torch.equal(some[0], full[0]) and torch.equal(some[2], full[2])
    with pytest.raises(ValueError, match=r"outside 0\.\.2"):
        model.hidden_states(batch["input_ids"], [3])


# ----------------------------------------------------------------------------- TransformerEngine


def _te_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True


@pytest.mark.skipif(_te_available(), reason="checks the error raised where TE/CUDA is missing")
def test_te_backend_without_te_or_cuda_is_a_clear_error() -> None:
    with pytest.raises(BackendUnavailableError, match="needs TransformerEngine on an NVIDIA GPU"):
        build_model(ModelConfig.from_preset("tiny", backend="te"))


def test_te_names_map_to_ours_and_back() -> None:
    state = random_model().state_dict()
    te_state = dict(state)
    rename_to_te(te_state, "layers.0.")
    assert (
        "layers.0.qkv.layer_norm_weight" in te_state and "layers.0.attn_norm.weight" not in te_state
    )
    assert torch.equal(te_state["layers.0.fc1.layer_norm_bias"], state["layers.0.mlp_norm.bias"])
    assert "layers.1.attn_norm.weight" in te_state  # other blocks untouched
    te_state["layers.0.qkv._extra_state"] = torch.empty(0)
    rename_from_te(te_state, "layers.0.")
    assert te_state.keys() == state.keys()
    assert all(torch.equal(te_state[k], v) for k, v in state.items())


@pytest.mark.gpu
@pytest.mark.skipif(not _te_available(), reason="needs CUDA and transformer_engine")
def test_te_backend_matches_torch_backend_on_gpu() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", num_heads=2)  # head size 32
    reference = random_model(num_heads=2).cuda()
    te_model = build_model(cfg.replace(backend="te"), device="cuda")
    te_model.load_state_dict(reference.state_dict())  # same checkpoint, either backend
    assert te_model.state_dict().keys() == reference.state_dict().keys()
    for key, value in te_model.state_dict().items():
        assert torch.equal(value, reference.state_dict()[key]), key
    token_lists = with_masks(real_sequences(8, 200))
    ids, seq_ids = (t.cuda() for t in pack_token_lists(token_lists))
    reference, te_model = reference.to(torch.bfloat16).eval(), te_model.to(torch.bfloat16).eval()
    with torch.no_grad():
        want = reference(ids, seq_ids=seq_ids)["logits"].float()
        got = te_model(ids, seq_ids=seq_ids)["logits"].float()
    keep = seq_ids >= 0
    rel = (got[keep] - want[keep]).norm() / want[keep].norm()
    assert rel < 2e-2, rel
    # Gradients flow through the TE blocks.
    te_model.train()
    labels = torch.where(ids == alphabet.MASK, 5, -100)
    te_model(ids, seq_ids=seq_ids, labels=labels)["loss"].backward()
    assert te_model.layers[0].qkv.weight.grad is not None
