"""How every sum over the samples of a batch is split, and which part of the batch this process holds.

Every reduction over the samples of a batch (weight and bias gradients, batch-norm statistics and
their backward sums, the loss) is computed per **chunk** of samples, and the chunks' partial sums
are added in chunk order. A batch of N samples has G = min(GRAD_CHUNKS, N) chunks; chunk c holds
samples [c*N//G, (c+1)*N//G). A chunk's partial depends on its samples alone (the kernels split
the work inside a chunk in a fixed way, never by thread count), so the sum is the same bit for bit
whoever computed the chunks: one process with any number of threads, or K processes (MPI,
DESIGN.md section 9) of which rank r holds the contiguous chunks [r*G//K, (r+1)*G//K) and gathers
the others' partials before adding them in chunk order. K can be at most G.

Layers read the shard of their forward's batch from ``Layer.batch_shard(n)``: the one the trainer
set for the step (``Sequential.set_shard``) when it holds n samples, else the whole batch of n in
this process.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

# Chunks per batch: fixed, so that the same config gives the same weights on any number of
# processes up to this many (and a batch of fewer samples has one chunk per sample).
GRAD_CHUNKS = 8

__all__ = ["GRAD_CHUNKS", "BatchShard", "chunk_bounds", "fold_into"]


def chunk_bounds(total: int) -> np.ndarray:
    """The G + 1 sample offsets of the chunks of a batch of ``total`` samples (int64)."""
    g = min(GRAD_CHUNKS, total)
    return np.array([c * total // g for c in range(g + 1)], dtype=np.int64) if g else np.zeros(1, np.int64)


def fold_into(partials: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out = partials[0] + partials[1] + ... added in that order (IEEE sums element by element, so
    the result never depends on threads or on how the rows were obtained); returns out."""
    out = out.reshape(partials.shape[1:])
    if partials.shape[0] == 0:
        out[...] = 0
        return out
    np.copyto(out, partials[0])
    for c in range(1, partials.shape[0]):
        np.add(out, partials[c], out=out)
    return out


class BatchShard:
    """The chunks of a batch of ``total`` samples that this process (rank ``group.rank`` of
    ``group.size``; one process when ``group`` is None) holds.

    ``start``/``stop``: the global sample range held (``local = stop - start`` samples);
    ``local_bounds``: the held chunks' sample offsets within it (int64, chunks + 1 values);
    ``counts``: how many chunks each rank holds (for gathering the partials).
    """

    def __init__(self, total: int, group=None):
        self.total = int(total)
        self.group = group
        size = 1 if group is None else int(group.size)
        rank = 0 if group is None else int(group.rank)
        bounds = chunk_bounds(self.total)
        self.chunks = len(bounds) - 1
        if size > self.chunks:
            raise ValueError(f"a batch of {self.total} samples has {self.chunks} chunks, fewer than the "
                             f"{size} processes that share it")
        self.counts = [(r + 1) * self.chunks // size - r * self.chunks // size for r in range(size)]
        c0 = rank * self.chunks // size
        c1 = (rank + 1) * self.chunks // size
        self.start = int(bounds[c0])
        self.stop = int(bounds[c1])
        self.local = self.stop - self.start
        self.local_bounds = bounds[c0:c1 + 1] - self.start

    @classmethod
    def whole(cls, total: int) -> "BatchShard":
        """A batch of ``total`` samples, all held by this process (one object per batch size: layers
        ask for it at every forward and backward)."""
        shard = _WHOLE.get(total)
        if shard is None:
            shard = _WHOLE[total] = cls(total)
        return shard

    @property
    def distributed(self) -> bool:
        return self.group is not None and self.group.size > 1

    def row_bounds(self, rows_per_sample: int) -> np.ndarray:
        """The held chunks' offsets in rows of a (local * rows_per_sample, C) view (int64)."""
        return self.local_bounds * int(rows_per_sample)

    def slices(self):
        """slice(start, stop) of each held chunk, in local sample offsets."""
        b = self.local_bounds
        return [slice(int(b[c]), int(b[c + 1])) for c in range(len(b) - 1)]

    def fold(self, partials: np.ndarray, out: np.ndarray) -> np.ndarray:
        """out = the sum over all the batch's chunks, in chunk order, of the per-chunk partial sums;
        ``partials`` (held chunks, *out.shape) holds this process's. Returns out (same on every rank)."""
        if self.distributed:
            partials = self.group.allgather_rows(np.ascontiguousarray(partials), self.counts)
        return fold_into(partials, out)

    def sum_chunks(self, buffer, compute, *outs) -> None:
        """outs = the sums over the batch's chunks of what ``compute(chunk_slice, *parts)`` writes
        (overwrites) into ``parts`` (arrays shaped like ``outs``) for one chunk's samples, added in
        chunk order. ``buffer(name, shape, dtype)``: the caller's scratch arrays (Layer._buffer).
        In one process the first chunk is computed into ``outs`` and each next one into scratch,
        then added: memory for one extra copy, not one per chunk."""
        slices = self.slices()
        if self.distributed:
            parts = [buffer(f"chunk_parts{i}", (len(slices), *o.shape), o.dtype) for i, o in enumerate(outs)]
            for c, sl in enumerate(slices):
                compute(sl, *(p[c] for p in parts))
            for p, o in zip(parts, outs):
                self.fold(p, o)
            return
        temps = [buffer(f"chunk_part{i}", o.shape, o.dtype) for i, o in enumerate(outs)] if len(slices) > 1 else []
        for c, sl in enumerate(slices):
            compute(sl, *(outs if c == 0 else temps))
            if c:
                for o, t in zip(outs, temps):
                    np.add(o, t, out=o)

    def sum_int(self, value: int) -> int:
        """An integer count summed over the processes (exact in any order)."""
        return int(self.group.allreduce_sum_int(int(value))) if self.distributed else int(value)


_WHOLE: dict = {}  # total -> BatchShard.whole(total); shards are never modified


def shard_for(shard: Optional[BatchShard], n: int) -> BatchShard:
    """``shard`` when it holds ``n`` samples, else the whole batch of ``n`` in this process."""
    if shard is not None and shard.local == n:
        return shard
    return BatchShard.whole(n)
