"""The vocabulary split of a tensor-parallel output head: which columns of the logits this rank holds, the
objective's reader of those columns, and the gather of full logits for sampling.

Each TP rank holds the columns [start, start + width) of the logits (``VocabShard``). ``reader(shard)`` is the
objective's ``mdtrain.objectives.logprob.LogitsReader`` over them: the log-normaliser is combined from per-rank
logsumexps (two all-reduces of B·L numbers: max, then the sum of exponentials); a gathered logit comes from the
rank that owns its column (an all-reduce of B·L·K numbers, zeros elsewhere); the backward needs no communication.
The suppressed class (SUBS's mask logit) is −∞ on the rank that owns it, so it is excluded from the normaliser,
gathered as −∞ and gets no gradient, exactly as on one device. Full-width logits (gathered, or another model's)
are read by the same reader as on one device, so training never gathers the full (B, L, V) logits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
import torch
import torch.distributed as dist

from mdtrain.objectives.logprob import LogitsReader, VocabPart


@dataclass(frozen=True)
class VocabShard:
    """This rank's slice of the vocabulary: columns [start, start + width) of ``vocab`` (padding excluded)."""
    vocab: int
    start: int
    width: int
    padded: int       # columns per rank including padding: ceil(vocab / tp)
    group: object     # the tensor-parallel process group
    size: int         # tensor-parallel world size

    @classmethod
    def of(cls, vocab: int, rank: int, size: int, group) -> "VocabShard":
        c = math.ceil(vocab / size)
        lo, hi = min(vocab, rank * c), min(vocab, (rank + 1) * c)
        return cls(vocab, lo, hi - lo, c, group, size)


def reader(shard: VocabShard) -> LogitsReader:
    """The logits reader of an objective whose network returns this rank's vocabulary columns."""
    group = shard.group

    def all_reduce_max(t: torch.Tensor) -> None:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)

    def all_reduce_sum(t: torch.Tensor) -> None:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)

    return LogitsReader(VocabPart(shard.vocab, shard.start, shard.width, all_reduce_max, all_reduce_sum))


@torch.no_grad()
def gather_vocab_logits(local: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """The full (..., V) logits on every TP rank (for sampling; never used in training)."""
    pad = shard.padded - local.shape[-1]
    padded = torch.nn.functional.pad(local, (0, pad)).contiguous()
    parts = [torch.empty_like(padded) for _ in range(shard.size)]
    dist.all_gather(parts, padded, group=shard.group)
    return torch.cat(parts, dim=-1)[..., :shard.vocab]
