"""The run's closing lines: the time breakdown."""

from cqd_mpi.run.report import format_times


def test_time_line_gives_the_remainder_beyond_the_phases():
    line = format_times({"merge": 2.0, "eval": 5.0}, wall=7.5)
    assert line == "time: wall=7.5s merge=2.0s eval=5.0s other=0.5s"


def test_overlapping_phases_are_shown_as_overlap_not_as_a_negative_remainder():
    line = format_times({"merge": 7.3, "transfer": 3.9, "eval": 0.0, "save": 0.9}, wall=10.4)
    assert line == "time: wall=10.4s merge=7.3s transfer=3.9s eval=0.0s save=0.9s other=0.0s overlapped=1.7s"
