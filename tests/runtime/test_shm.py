"""runtime/shm.py's clearing of a SLURM job's segments before its ranks start (jobs/lib.sh)."""

import mmap

from cqd_mpi.runtime import shm


def test_clear_job_removes_the_unmapped_segments_named_after_the_jobs_steps(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(shm, "SHM_DIR", tmp_path)
    # MPICH 5 under SLURM's pmi2: the FNV-1a hash of "<job>.<step>" (seen on env/slurm-multinode.sh:
    # job 11, step 0 made mpich_shm_d5b6791_<node>)
    assert "mpich_shm_d5b6791_" in shm.job_segment_prefixes("11")
    ours = [f"mpich_shm_{shm._fnv1a('42.1'):x}_0", f"mpich_vci_{shm._fnv1a('42.0'):x}_2"]
    mapped = f"mpich_shm_{shm._fnv1a('42.3'):x}_1"
    others = [f"mpich_shm_{shm._fnv1a('420.1'):x}_0", f"mpich_shm_{shm._fnv1a('43.1'):x}_0", "cqd_mpi-0"]
    for name in [*ours, mapped, *others]:
        (tmp_path / name).write_bytes(b"\0" * 4096)
    with open(tmp_path / mapped, "r+b") as handle, mmap.mmap(handle.fileno(), 4096):
        assert sorted(shm.clear_job("42")) == sorted(ours)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mapped, *others])
    assert shm.main(["clear-job", "42"]) == 0  # unmapped now: removed, and said so
    assert f"removed 1 shared-memory segment(s) left by ended jobs: {mapped}" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(others)
    assert shm.main(["clear-job"]) == 2
    assert "usage: python -m cqd_mpi.runtime.shm clear-job JOB_ID (got: clear-job)" in capsys.readouterr().err
