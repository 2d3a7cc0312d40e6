"""Token layout: how the sequences of a padded or packed batch are laid out inside the model.

The blocks work on a flat stream of *slots* ``[s, hidden]`` rather than on the ``[B, T]`` batch.

* Bucketed (the PyTorch backend): sequences are grouped into a few buckets of similar length;
  bucket ``b`` holds ``n_b`` sequences padded to its longest, ``L_b``, as ``n_b * L_b`` contiguous
  slots, so attention is one ``scaled_dot_product_attention`` call per bucket on a *view* of the
  stream (key-padding mask only where lengths differ). The bucket plan minimises the estimated
  cost ``sum n_b * L_b * (token_cost + L_b)`` (dense layers + attention), so short sequences do
  not pay for the longest one and batch padding never reaches the dense layers.
* Unbucketed (TransformerEngine): the slots are exactly the real tokens, sequence after sequence,
  described by ``cu_seqlens`` for TE's variable-length (``thd``) attention.

Input forms (both ``[B, T]``):

* padded: ``attention_mask`` (1 = token, 0 = padding, right padding); one sequence per row;
* packed: ``seq_ids`` (int, -1 = padding); sequences are contiguous runs of one id in a row,
  several to a row; rotary positions restart at 0 for each sequence.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

#: Most attention buckets per batch, and the planning cost of one more bucket.
MAX_BUCKETS = 6
BUCKET_OVERHEAD = 64 * 64 * 8
#: Default relative cost of a slot in the dense layers, in units of attention token-pairs.
DEFAULT_TOKEN_COST = 768


@dataclass
class AttentionBucket:
    """``count`` sequences padded to ``width`` slots each, from slot ``start`` on."""

    start: int
    count: int
    width: int
    mask: torch.Tensor | None  # [count, 1, 1, width] bool, True = real key; None if all full


@dataclass
class TokenLayout:
    """Index tensors describing one batch's slots (all on the batch's device)."""

    batch_shape: tuple[int, int]
    token_index: torch.Tensor  # [t] flat index into B*T of each real token (batch order)
    slot_of_token: torch.Tensor | None  # [t] slot of each real token; None: slot i = token i
    positions: torch.Tensor  # [s] position of each slot within its sequence
    seq_index: torch.Tensor  # [s] sequence of each slot
    lengths: torch.Tensor  # [S] real tokens per sequence
    cu_seqlens: torch.Tensor  # [S+1] int32 offsets of the sequences among the real tokens
    max_seqlen: int
    buckets: list[AttentionBucket]  # empty when unbucketed
    dense: bool  # no padding and one sequence per row: tokens, slots and batch coincide

    @property
    def num_tokens(self) -> int:
        """Real tokens in the batch."""
        return int(self.token_index.numel())

    @property
    def num_slots(self) -> int:
        """Slots in the stream (real tokens plus bucket padding)."""
        return int(self.positions.numel())

    @property
    def num_sequences(self) -> int:
        """Sequences in the batch."""
        return int(self.lengths.numel())

    def to_slots(self, batch_tensor: torch.Tensor, fill: float | int = 0) -> torch.Tensor:
        """A batch tensor ``[B, T, ...]`` laid out as slots ``[s, ...]`` (``fill`` in padding)."""
        flat = batch_tensor.reshape(-1, *batch_tensor.shape[2:])
        if self.dense:
            return flat
        tokens = flat.index_select(0, self.token_index)
        if self.slot_of_token is None:
            return tokens
        out = tokens.new_full((self.num_slots, *tokens.shape[1:]), fill)
        return out.index_copy(0, self.slot_of_token, tokens)

    def from_slots(self, slots: torch.Tensor) -> torch.Tensor:
        """The real tokens ``[t, ...]`` (batch order) of a slot tensor ``[s, ...]``."""
        if self.slot_of_token is None:
            return slots
        return slots.index_select(0, self.slot_of_token)

    def scatter(self, tokens: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """Put real-token values ``[t, ...]`` back into the batch shape ``[B, T, ...]``."""
        batch, length = self.batch_shape
        if self.dense:
            return tokens.reshape(batch, length, *tokens.shape[1:])
        out = tokens.new_full((batch * length, *tokens.shape[1:]), fill)
        out = out.index_copy(0, self.token_index, tokens)
        return out.reshape(batch, length, *tokens.shape[1:])

    def gather(self, batch_tensor: torch.Tensor) -> torch.Tensor:
        """The real tokens ``[t, ...]`` of a batch tensor ``[B, T, ...]``."""
        flat = batch_tensor.reshape(-1, *batch_tensor.shape[2:])
        return flat if self.dense else flat.index_select(0, self.token_index)

    def with_extra_sequence(self, count: int) -> TokenLayout:
        """This (unbucketed) stream followed by ``count`` dummy slots forming one more sequence.

        Rounds the slot count up for FP8 GEMMs; only the first ``num_slots`` outputs are real.
        """
        if self.buckets:
            raise ValueError("with_extra_sequence needs an unbucketed layout")
        device = self.positions.device
        lengths = torch.cat([self.lengths, torch.tensor([count], device=device)])
        extra = torch.arange(count, device=device)
        return TokenLayout(
            batch_shape=self.batch_shape,
            token_index=self.token_index,
            slot_of_token=self.slot_of_token,
            positions=torch.cat([self.positions, extra]),
            seq_index=torch.cat([self.seq_index, torch.full_like(extra, self.num_sequences)]),
            lengths=lengths,
            cu_seqlens=_cumulative(lengths),
            max_seqlen=max(self.max_seqlen, count),
            buckets=[],
            dense=False,
        )


def build_layout(
    attention_mask: torch.Tensor | None = None,
    seq_ids: torch.Tensor | None = None,
    *,
    input_shape: tuple[int, int] | None = None,
    bucketed: bool = True,
    token_cost: float = DEFAULT_TOKEN_COST,
) -> TokenLayout:
    """The layout of a padded (``attention_mask``) or packed (``seq_ids``) batch.

    With neither, every token of ``input_shape`` is real and each row is one sequence.
    """
    device = None
    if seq_ids is not None:
        if seq_ids.dim() != 2:
            raise ValueError(f"seq_ids must be [batch, length], got shape {tuple(seq_ids.shape)}")
        valid = seq_ids >= 0
        if attention_mask is not None:
            valid = valid & attention_mask.bool()
        batch, length = seq_ids.shape
        device = seq_ids.device
    elif attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError(
                f"attention_mask must be [batch, length], got shape {tuple(attention_mask.shape)}"
            )
        valid = attention_mask.bool()
        batch, length = attention_mask.shape
        device = attention_mask.device
    else:
        if input_shape is None:
            raise ValueError("build_layout needs attention_mask, seq_ids or input_shape")
        batch, length = input_shape
        return _dense_layout(batch, length, None, bucketed)

    if seq_ids is None and bool(valid.all()):
        return _dense_layout(batch, length, device, bucketed)
    token_index = valid.reshape(-1).nonzero().squeeze(1)
    num_tokens = int(token_index.numel())
    if num_tokens == 0:
        raise ValueError("the batch has no tokens (everything is padding)")
    row = torch.div(token_index, length, rounding_mode="floor")
    new_seq = torch.ones(num_tokens, dtype=torch.bool, device=device)
    if num_tokens > 1:
        boundary = row[1:] != row[:-1]
        if seq_ids is not None:
            key = seq_ids.reshape(-1).index_select(0, token_index)
            boundary = boundary | (key[1:] != key[:-1])
        new_seq[1:] = boundary
    starts = new_seq.nonzero().squeeze(1)
    if starts.numel() == batch and num_tokens == batch * length:
        return _dense_layout(batch, length, device, bucketed)
    ends = torch.cat([starts[1:], torch.tensor([num_tokens], device=device)])
    lengths = ends - starts
    if bucketed:
        return _bucketed_layout((batch, length), token_index, starts, lengths, token_cost)
    seq_index = torch.zeros(num_tokens, dtype=torch.long, device=device)
    seq_index[starts[1:]] = 1
    seq_index = seq_index.cumsum(0)
    return TokenLayout(
        batch_shape=(batch, length),
        token_index=token_index,
        slot_of_token=None,
        positions=torch.arange(num_tokens, device=device) - starts.index_select(0, seq_index),
        seq_index=seq_index,
        lengths=lengths,
        cu_seqlens=_cumulative(lengths),
        max_seqlen=int(lengths.max()),
        buckets=[],
        dense=False,
    )


def _dense_layout(
    batch: int, length: int, device: torch.device | None, bucketed: bool
) -> TokenLayout:
    lengths = torch.full((batch,), length, dtype=torch.long, device=device)
    return TokenLayout(
        batch_shape=(batch, length),
        token_index=torch.arange(batch * length, device=device),
        slot_of_token=None,
        positions=torch.arange(length, device=device).repeat(batch),
        seq_index=torch.arange(batch, device=device).repeat_interleave(length),
        lengths=lengths,
        cu_seqlens=_cumulative(lengths),
        max_seqlen=length,
        buckets=[AttentionBucket(0, batch, length, None)] if bucketed else [],
        dense=True,
    )


def _bucketed_layout(
    batch_shape: tuple[int, int],
    token_index: torch.Tensor,
    starts: torch.Tensor,
    lengths: torch.Tensor,
    token_cost: float,
) -> TokenLayout:
    device = lengths.device
    host_lengths = lengths.tolist()
    buckets: list[AttentionBucket] = []
    slot_base = [0] * len(host_lengths)
    positions, seq_index = [], []
    offset = 0
    for members in plan_buckets(host_lengths, token_cost=token_cost):
        width = host_lengths[members[0]]
        for rank, member in enumerate(members):
            slot_base[member] = offset + rank * width
        member_index = torch.tensor(members, dtype=torch.long, device=device)
        slots = torch.arange(width, device=device)
        positions.append(slots.repeat(len(members)))
        seq_index.append(member_index.repeat_interleave(width))
        mask = None
        if min(host_lengths[m] for m in members) != width:
            valid = slots.unsqueeze(0) < lengths.index_select(0, member_index).unsqueeze(1)
            mask = valid[:, None, None, :]
        buckets.append(AttentionBucket(offset, len(members), width, mask))
        offset += len(members) * width
    # Tokens are in batch order, sequence after sequence: token j of sequence i -> its slot.
    token_seq = torch.repeat_interleave(torch.arange(len(host_lengths), device=device), lengths)
    token_pos = torch.arange(token_index.numel(), device=device) - starts.index_select(0, token_seq)
    base = torch.tensor(slot_base, dtype=torch.long, device=device)
    return TokenLayout(
        batch_shape=batch_shape,
        token_index=token_index,
        slot_of_token=base.index_select(0, token_seq) + token_pos,
        positions=torch.cat(positions),
        seq_index=torch.cat(seq_index),
        lengths=lengths,
        cu_seqlens=_cumulative(lengths),
        max_seqlen=max(host_lengths),
        buckets=buckets,
        dense=False,
    )


def plan_buckets(
    lengths: list[int],
    token_cost: float = DEFAULT_TOKEN_COST,
    max_buckets: int = MAX_BUCKETS,
    overhead: float = BUCKET_OVERHEAD,
) -> list[list[int]]:
    """Group sequences (by index) into at most ``max_buckets`` runs of similar length.

    Minimises ``sum(members * longest * (token_cost + longest)) + overhead * buckets`` over
    splits of the length-sorted order (dynamic programming). Each bucket lists its longest
    sequence first; ties keep the input order.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    if len(order) <= 1 or max_buckets <= 1:
        return [order]
    if len(order) > 1024:  # keep planning cheap: equal-count runs
        chunk = -(-len(order) // max_buckets)
        return [order[i : i + chunk] for i in range(0, len(order), chunk)]
    longest = np.asarray([lengths[i] for i in order], dtype=np.float64)
    unit = longest * (token_cost + longest)  # cost of one slot row of a bucket led by i
    n = len(order)
    idx = np.arange(n + 1)
    span = idx[None, :] - idx[:-1, None]  # cost[i, j]: sorted sequences i..j-1 in one bucket
    cost = np.where(span > 0, span * unit[:, None] + overhead, np.inf)
    best = cost[0].copy()
    choices = []
    for _ in range(1, max_buckets):
        total = best[:-1, None] + cost  # last bucket starts at i >= 1
        total[0] = np.inf
        arg = np.argmin(total, axis=0)
        new = total[arg, idx]
        improved = new < best
        choices.append(np.where(improved, arg, -1))
        best = np.where(improved, new, best)
    splits: list[int] = []
    j = n
    for choice in reversed(choices):
        i = int(choice[j])
        if i > 0:
            splits.append(i)
            j = i
    bounds = [0, *sorted(splits), n]
    return [order[a:b] for a, b in itertools.pairwise(bounds)]


def _cumulative(lengths: torch.Tensor) -> torch.Tensor:
    zero = torch.zeros(1, dtype=torch.int32, device=lengths.device)
    return torch.cat([zero, lengths.cumsum(0).to(torch.int32)])


def pack_token_lists(
    token_lists: list[list[int]], row_tokens: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack token id lists into rows: ``(input_ids, seq_ids)``, both ``[rows, T]``.

    Without ``row_tokens`` everything goes in one row; with it, a new row starts whenever the
    next list would take the row past ``row_tokens`` tokens (a longer list gets a row of its own).
    Order is kept, so sequence ``i`` of the layout is list ``i``. Rows are right-padded with
    ``<pad>`` and seq id -1.
    """
    from training.alphabet import PAD

    if not token_lists:
        raise ValueError("cannot pack an empty batch")
    rows: list[list[int]] = [[]]  # indices of the lists in each row
    fill = [0]
    for i, toks in enumerate(token_lists):
        if row_tokens is not None and rows[-1] and fill[-1] + len(toks) > row_tokens:
            rows.append([])
            fill.append(0)
        rows[-1].append(i)
        fill[-1] += len(toks)
    width = max(fill)
    input_ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    seq_ids = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, members in enumerate(rows):
        pos = 0
        for i in members:
            toks = token_lists[i]
            input_ids[r, pos : pos + len(toks)] = torch.as_tensor(toks, dtype=torch.long)
            seq_ids[r, pos : pos + len(toks)] = i
            pos += len(toks)
    return input_ids, seq_ids
