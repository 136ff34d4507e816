import pytest

from pdbridge.engine.block_pool import BlockPool, BlockPoolError


def test_allocations_are_contiguous_runs():
    pool = BlockPool(10)
    a, b = pool.allocate(3), pool.allocate(4)
    assert a == [0, 1, 2] and b == [3, 4, 5, 6]
    pool.free(a)
    assert pool.free_runs() == [(0, 3), (7, 3)]


def test_first_fit_skips_short_runs_and_splits_when_nothing_fits():
    pool = BlockPool(8)
    ids = pool.allocate(8)
    pool.free([1, 4, 5, 6])                 # runs (1,1) and (4,3)
    assert pool.allocate(2) == [4, 5]       # first run long enough
    assert pool.allocate(2) == [1, 6]       # no run long enough: earliest ids first
    assert pool.num_free == 0
    assert len(set(ids)) == 8


def test_extend_continues_the_last_run():
    pool = BlockPool(8)
    a = pool.allocate(2)
    assert pool.extend(a, 3) == [2, 3, 4]
    b = pool.allocate(1)
    assert b == [5]
    # a's next id is taken: extension falls back to first fit
    assert pool.extend([0, 1, 2, 3, 4], 2) == [6, 7]


def test_free_merges_runs_back_to_one():
    pool = BlockPool(6)
    ids = [pool.allocate(1)[0] for _ in range(6)]
    for b in (0, 2, 4, 1, 5, 3):
        pool.free([b])
    assert pool.free_runs() == [(0, 6)]
    assert ids == list(range(6))


def test_double_free_raises_and_frees_nothing():
    pool = BlockPool(4)
    a = pool.allocate(2)
    pool.free([a[0]])
    with pytest.raises(BlockPoolError, match="freed twice"):
        pool.free([a[1], a[0]])
    assert pool.num_free == 3               # a[1] was not freed by the failed call
    with pytest.raises(BlockPoolError, match="repeated"):
        pool.free([a[1], a[1]])
    with pytest.raises(BlockPoolError, match="outside"):
        pool.free([4])


def test_exhaustion():
    pool = BlockPool(3)
    pool.allocate(2)
    with pytest.raises(BlockPoolError, match="2 requested, 1 of 3 free"):
        pool.allocate(2)
    assert pool.allocate(1) == [2]
    with pytest.raises(BlockPoolError):
        pool.extend([2], 1)
