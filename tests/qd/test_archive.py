import numpy as np
import pytest

from cqd_mpi.qd.archive import Archive, Bins


def test_bins_index_clips_and_splits_evenly():
    bins = Bins(lower=0.2, upper=0.8, n_bins=3)
    assert [bins.index(v) for v in (-1.0, 0.2, 0.39, 0.4, 0.61, 0.79, 0.8, 5.0)] == [0, 0, 0, 1, 2, 2, 2, 2]
    np.testing.assert_allclose(bins.edges(), [0.2, 0.4, 0.6, 0.8])


def test_auto_bins_follow_design_factors():
    bins = Bins.from_experts([0.4, 0.6, 0.5], n_bins=15)
    assert bins.lower == pytest.approx(0.34)
    assert bins.upper == pytest.approx(0.69)
    assert bins.n_bins == 15


def test_auto_bins_widen_an_empty_range():
    bins = Bins.from_experts([0.0, 0.0], n_bins=10)
    assert (bins.lower, bins.upper) == (0.0, pytest.approx(0.1))


def test_bins_reject_empty_range():
    with pytest.raises(ValueError, match="upper > lower"):
        Bins(0.5, 0.5, 3)


def make_archive():
    bins = Bins(0.0, 1.0, 4)
    return Archive(quality_task=0, bc_tasks=[1, 2], bins=[bins, bins])


def test_offer_enters_empty_cell_and_needs_strict_improvement():
    archive = make_archive()
    first = archive.offer(7, [0.5, 0.1, 0.9], stamp=0)
    assert first.entered and first.cell == (0, 3) and first.evicted == -1
    tie = archive.offer(8, [0.5, 0.2, 0.8], stamp=1)
    assert not tie.entered
    better = archive.offer(9, [0.6, 0.2, 0.8], stamp=2)
    assert better.entered and better.evicted == 7
    assert archive.occupant[0, 3] == 9 and archive.quality[0, 3] == 0.6 and archive.inserted[0, 3] == 2
    assert archive.coverage() == pytest.approx(1 / 16)
    assert archive.qd_score() == pytest.approx(0.6)


def test_elite_prefers_quality_then_most_recent():
    archive = make_archive()
    archive.offer(1, [0.7, 0.1, 0.1], stamp=0)
    archive.offer(2, [0.7, 0.9, 0.9], stamp=1)
    archive.offer(3, [0.5, 0.5, 0.5], stamp=2)
    assert archive.elite() == 2
    archive.offer(4, [0.7, 0.6, 0.1], stamp=3)
    assert archive.elite() == 4
    np.testing.assert_array_equal(np.sort(archive.members()), [1, 2, 3, 4])
