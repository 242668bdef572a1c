import tracemalloc

import numpy as np
import pytest

from codec.shards import LatentShards
from diffusion.draws import EpochOrder, TrainingDraws

# Ten chunks of uneven sizes, one of them empty: 45 records.
SIZES = [5, 0, 7, 3, 9, 4, 6, 1, 8, 2]


def epoch(order: EpochOrder, e: int) -> list[int]:
    n = len(order)
    return [order[d] for d in range(e * n, (e + 1) * n)]


def test_each_epoch_is_a_permutation_of_every_record_reshuffled_per_epoch_and_fixed_by_the_seed():
    order = EpochOrder(SIZES, seed=3, shuffle_chunks=3)
    assert len(order) == 45
    epochs = [epoch(order, e) for e in range(4)]
    for records in epochs:
        assert sorted(records) == list(range(45))
    assert len({tuple(records) for records in epochs}) == 4  # every epoch its own order
    # No hidden state: a fresh order with the same seed gives the same draws, read in any order.
    again = EpochOrder(SIZES, seed=3, shuffle_chunks=3)
    assert [again[d] for d in reversed(range(4 * 45))] == [r for records in reversed(epochs) for r in reversed(records)]
    assert epoch(EpochOrder(SIZES, seed=4, shuffle_chunks=3), 0) != epochs[0]


def test_a_window_reads_whole_chunks_shuffle_chunks_at_a_time():
    """12 chunks of 5 records, windows of 3 chunks: draws 15k..15k+14 are all the records of exactly 3 chunks (the
    records of chunk c are 5c..5c+4), mixed; every chunk belongs to one window of the epoch."""
    order = EpochOrder([5] * 12, seed=0, shuffle_chunks=3)
    for e in range(3):
        records = np.array(epoch(order, e))
        windows = [records[k : k + 15] for k in range(0, 60, 15)]
        chunk_sets = [set((window // 5).tolist()) for window in windows]
        for window, chunks in zip(windows, chunk_sets):
            assert len(chunks) == 3
            assert sorted(window.tolist()) == sorted(5 * c + r for c in chunks for r in range(5))
        assert sorted(c for chunks in chunk_sets for c in chunks) == list(range(12))
        # Shuffled inside the window, not read chunk after chunk.
        assert any((np.diff(window // 5) != 0).sum() > 2 for window in windows)
    # The chunk order itself changes between epochs.
    assert [set((np.array(epoch(order, e))[:15] // 5).tolist()) for e in range(3)] != [set()] * 3
    # One chunk per window: each chunk's records together, in a shuffled order.
    single = np.array(epoch(EpochOrder([5] * 12, seed=0, shuffle_chunks=1), 0)).reshape(12, 5)
    assert all(len(set((row // 5).tolist())) == 1 for row in single)


def test_uneven_and_empty_chunks_keep_windows_whole():
    order = EpochOrder(SIZES, seed=1, shuffle_chunks=3)
    firsts = np.cumsum(SIZES) - SIZES
    for e in range(3):
        windows: dict[int, list[int]] = {}
        for d in range(e * 45, (e + 1) * 45):
            windows.setdefault(order.window_of(d)[1], []).append(order[d])
        assert len(windows) <= 4  # ceil(10 chunks / 3)
        for records in windows.values():
            chunks = set(np.searchsorted(firsts, records, side="right") - 1)
            assert len(chunks) <= 3
            assert sorted(records) == [r for c in sorted(chunks) for r in range(firsts[c], firsts[c] + SIZES[c])]


def test_ten_million_records_in_ten_thousand_chunks_hold_no_per_record_python_objects():
    """The order this replaced, torch.randperm(10M).tolist(), peaks at 401 MB under tracemalloc and took 10.9 s here;
    this one holds the chunk order and window ends (10k entries each) and one window of 16k records: measured
    peak 0.43 MB for the draws below. We require under 5 MB."""
    tracemalloc.start()
    try:
        order = EpochOrder(np.full(10_000, 1_000, dtype=np.int64), seed=0, shuffle_chunks=16)
        first_window = np.fromiter((order[d] for d in range(16_000)), np.int64, 16_000)
        last, next_epoch = order[9_999_999], order[10_000_000]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000, peak
    assert len(order) == 10_000_000 and 0 <= last < 10_000_000 and 0 <= next_epoch < 10_000_000
    # The first window: all 16k records of 16 whole chunks.
    assert len(np.unique(first_window)) == 16_000 and len(np.unique(first_window // 1_000)) == 16


def test_training_draws_read_every_record_of_the_shards_once_per_epoch_a_chunk_at_a_time(tiny_shards,
                                                                                          tiny_unet_config):
    shards = LatentShards(tiny_shards)
    sizes = shards.chunk_sizes
    assert len(shards) == 8 and sizes.sum() == 8
    chunk_of = np.repeat(np.arange(len(sizes)), sizes)  # record -> its chunk
    draws = TrainingDraws(shards, tiny_unet_config.diffusion, seed=0, shuffle_chunks=1)
    for e in range(2):
        records = [draws.record(d) for d in range(8 * e, 8 * (e + 1))]
        assert sorted(records) == list(range(8))
        # One chunk per window: each chunk's records are read together, in one run of draws.
        runs = 1 + int((np.diff(chunk_of[records]) != 0).sum())
        assert runs == int((sizes > 0).sum())
    assert draws[3]["caption"] == shards[draws.record(3)]["caption"]
    with pytest.raises(ValueError, match="shuffle_chunks"):
        TrainingDraws(shards, tiny_unet_config.diffusion, seed=0, shuffle_chunks=0)
