"""Randomness keyed by position, not by process.

Every sample's diffusion noise is drawn from a generator seeded by (seed, step, global sample index), so a resumed run
repeats a step exactly and the noise does not depend on how the global batch is split over ranks and accumulation
steps. The index follows the loader's stream order, where micro-step a of every step hands data-parallel rank r the
r-th block of ``micro`` samples: row i there has global index ``(a * dp + r) * micro + i``. One process running
``accum * dp`` micro-steps of the same size, or fewer larger ones, sees each sample with the same index.
"""
from __future__ import annotations

import hashlib

import torch


def key(*parts: int) -> int:
    """A 63-bit seed from integers (stable across platforms and Python versions, unlike hash())."""
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(int(p).to_bytes(16, "little", signed=True))
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


STREAM_NOISE, STREAM_DROPOUT, STREAM_EVAL = 1, 2, 3


def keyed_noise(spec: dict[str, tuple], stratified: tuple[str, ...], seed: int, step: int,
                global_indices: list[int], total: int, stream: int = STREAM_NOISE) -> dict[str, torch.Tensor]:
    """Uniform[0,1) draws of shape (B, *spec[k]) per key; keys in ``stratified`` get u <- (u + g mod total) / total."""
    out: dict[str, list] = {k: [] for k in spec}
    for g in global_indices:
        gen = torch.Generator().manual_seed(key(stream, seed, step, g))
        for k, shape in spec.items():
            out[k].append(torch.rand(tuple(shape), generator=gen, dtype=torch.float64))
    noise = {}
    for k, rows in out.items():
        u = torch.stack(rows)
        if k in stratified:
            # stratum = position within its batch of ``total`` (eval keys run past one batch)
            idx = torch.tensor([g % total for g in global_indices], dtype=torch.float64).view(-1, *([1] * (u.ndim - 1)))
            u = (u + idx) / total
        noise[k] = u
    return noise


def seed_dropout(seed: int, step: int, rank: int, micro: int) -> None:
    """Seed torch's global generators (CPU and CUDA) for this micro-batch's dropout masks."""
    torch.manual_seed(key(STREAM_DROPOUT, seed, step, rank, micro))
