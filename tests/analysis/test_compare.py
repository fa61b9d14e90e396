"""compare's reading of a real finished run (analysis/compare.py): the models its search
evaluated and their summed times, as the conductor recorded them in state.h5."""

import math

import h5py
import numpy as np

from cqd_mpi.analysis.compare import read_run
from tests.analysis.runs import GENERATIONS, finished_run


def test_a_real_run_reports_its_models_evaluated_and_search_time(tmp_path_factory, tiny_family):
    path = finished_run(tmp_path_factory, tiny_family, 3)
    result = read_run(path)
    with h5py.File(path / "state.h5", "r") as f:
        total = f["history/total_s"][...]
        assert "curve" not in f
    assert result.models_evaluated == GENERATIONS == len(total) and result.method == "CycleQD"
    assert np.all(total > 0) and math.isclose(result.search_seconds, float(total.sum()))
    assert result.curve is None and result.label == "CycleQD + SVD mutation + elite sampling"
