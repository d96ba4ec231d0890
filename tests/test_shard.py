"""fastcnn/shard.py: how a batch is split into chunks and shared by processes (without MPI: a fake
group stands for the other processes, whose partial sums it holds)."""
import numpy as np
import pytest

from fastcnn.shard import GRAD_CHUNKS, BatchShard, chunk_bounds, fold_into, shard_for


@pytest.mark.parametrize("total", [1, 2, 7, 8, 9, 64, 80, 128, 1001])
def test_chunk_bounds_cover_the_batch_in_balanced_chunks(total):
    b = chunk_bounds(total)
    g = min(GRAD_CHUNKS, total)
    assert len(b) == g + 1 and b[0] == 0 and b[-1] == total
    sizes = np.diff(b)
    assert sizes.min() >= 1 and sizes.max() - sizes.min() <= 1


@pytest.mark.parametrize("total,size", [(64, 1), (64, 2), (64, 4), (128, 3), (80, 8), (5, 5)])
def test_processes_hold_contiguous_whole_chunks_covering_the_batch(total, size):
    class Group:
        def __init__(self, rank):
            self.rank, self.size = rank, size

    shards = [BatchShard(total, Group(r) if size > 1 else None) for r in range(size)]
    bounds = chunk_bounds(total)
    assert shards[0].start == 0 and shards[-1].stop == total
    for a, b in zip(shards, shards[1:]):
        assert a.stop == b.start
    for s in shards:
        assert s.counts == shards[0].counts and sum(s.counts) == len(bounds) - 1
        assert set(s.start + s.local_bounds) <= set(bounds)  # whole chunks only
        assert s.local == s.stop - s.start >= 1


def test_more_processes_than_chunks_is_refused():
    class Group:
        rank, size = 0, 3

    with pytest.raises(ValueError, match="2 chunks, fewer than the 3 processes"):
        BatchShard(2, Group())


def test_fold_adds_in_chunk_order():
    parts = np.array([[1e8], [1.0], [-1e8], [1.0]], np.float32)
    out = fold_into(parts, np.empty(1, np.float32))
    assert out[0] == np.float32(np.float32(np.float32(1e8 + 1.0) - 1e8) + 1.0)


class FakeGroup:
    """Rank ``rank`` of ``size``; allgather_rows returns the other ranks' rows from ``others``."""

    def __init__(self, rank, size, others):
        self.rank, self.size, self.others = rank, size, others

    def allgather_rows(self, local, counts):
        rows = [self.others[r] if r != self.rank else local for r in range(self.size)]
        for r, rows_r in enumerate(rows):
            assert len(rows_r) == counts[r]
        return np.concatenate(rows)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sum_chunks_gives_the_same_bits_in_one_process_and_in_two(dtype):
    """What the layers rely on: the total of per-chunk sums does not depend on which process
    computed which chunk (one process adds as it goes, two gather then add)."""
    rng = np.random.default_rng(0)
    total = 80
    x = rng.standard_normal((total, 5)).astype(dtype) * np.array([1, 1e4, 1e-4, 1, 3], dtype)

    def compute(xs):
        return lambda s, out: np.copyto(out, xs[s].sum(axis=0, dtype=dtype))

    one = np.empty(5, dtype)
    BatchShard(total).sum_chunks(lambda name, shape, dtype: np.empty(shape, dtype), compute(x), one)
    # Two processes: rank 1's partials, then rank 0 gathering them.
    shard1 = BatchShard(total, FakeGroup(1, 2, {}))
    part1 = np.stack([x[shard1.start:][s].sum(axis=0, dtype=dtype) for s in shard1.slices()])
    shard0 = BatchShard(total, FakeGroup(0, 2, {1: part1}))
    two = np.empty(5, dtype)
    shard0.sum_chunks(lambda name, shape, dtype: np.empty(shape, dtype),
                      compute(x[shard0.start:shard0.stop]), two)
    assert one.tobytes() == two.tobytes()
    np.testing.assert_allclose(one, x.sum(axis=0, dtype=np.float64), rtol=1e-4)


def test_shard_for_uses_the_step_shard_only_for_its_batch():
    shard = BatchShard(64, FakeGroup(1, 4, {}))
    assert shard_for(shard, shard.local) is shard
    whole = shard_for(shard, 64)
    assert whole is not shard and whole.total == 64 and whole.local == 64
    assert shard_for(None, 10).total == 10
