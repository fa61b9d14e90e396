# Shared by the sbatch scripts in jobs/: run cqd_mpi under srun, forward SLURM's warning
# signal, and requeue the job until the run's state says it is done.
#
# Usage (from an sbatch script): source jobs/lib.sh; cqd_run CONFIG [ARGS...] (cqd_env alone
# sets up the environment for other cqd_mpi commands)
#
#   CQD_SRUN_MPI  srun's --mpi plugin for the ranks (default: the cluster's MpiDefault). The pip
#                 mpich wheel needs pmi2; a site MPI its own (pmix for most Open MPI builds).
#                 See env/README.md.

cqd_phase() {
  # The run's phase from its state file (init, search, final, done), "none", or "unknown"
  # (the config or the state cannot be read; the run has said why).
  python - "$1" <<'PY'
import sys
from cqd_mpi.errors import CqdError
from cqd_mpi.run import config
from cqd_mpi.run.rundir import RunDir
from cqd_mpi.run.state import HDF5Backend
try:
    run = RunDir(config.load(sys.argv[1], check_files=False).runtime.run_dir)
    core = HDF5Backend(run.state_path).load() if run.has_state() else None
except CqdError as exc:
    print(f"cqd_mpi: cannot read the run's phase: {exc}", file=sys.stderr)
    print("unknown")
else:
    print(core.phase if core else "none")
PY
}

cqd_lost() {
  # What the run's conductor wrote in this start of this job when ranks or a node were lost
  # (runtime/mpi.py's LOST_FILE), or nothing.
  python - "$1" <<'PY' 2>/dev/null
import sys
from cqd_mpi.run import config
from cqd_mpi.run.rundir import RunDir
from cqd_mpi.runtime.mpi import LOST_FILE, lost_stamp
lost = RunDir(config.load(sys.argv[1], check_files=False).runtime.run_dir).logs_dir / LOST_FILE
stamp, _, message = (lost.read_text() if lost.is_file() else "").partition("\n")
print(message.strip() if stamp == lost_stamp() else "")
PY
}

cqd_env() {
  # Source CQD_ENV (default env/cluster.sh of the submit dir) if it exists: module loads, venv.
  local env_script=${CQD_ENV:-${SLURM_SUBMIT_DIR:-.}/env/cluster.sh}
  if [ -f "$env_script" ]; then
    # shellcheck disable=SC1090
    source "$env_script"
  fi
}

cqd_run() {
  local config=$1
  shift
  local restarts=${SLURM_RESTART_COUNT:-0}
  local max_restarts=${CQD_MAX_RESTARTS:-20}
  cqd_env
  if (( restarts > max_restarts )); then
    echo "cqd_mpi: job restarted $restarts times (CQD_MAX_RESTARTS=$max_restarts); not running again" >&2
    return 1
  fi
  echo "cqd_mpi: job ${SLURM_JOB_ID:-?} start $((restarts + 1)) on ${SLURM_JOB_NUM_NODES:-1} node(s), ${SLURM_NTASKS:-1} ranks, $(date -Is)"

  local signalled=0 srun_pid=""
  # The trap is set before srun starts: a warning signal that came in between would end bash.
  trap 'signalled=1; echo "cqd_mpi: time limit near: asking all ranks to checkpoint and stop"; [ -z "$srun_pid" ] || kill -USR1 "$srun_pid"' USR1 TERM
  # MPICH names a node's shared-memory segment after the job step ("<job id>.<step id>"), so
  # this start's ranks would open as their own a segment that an earlier start of this job left
  # on a node (its ranks killed) and fail in MPI_Init or read dead bytes. One task per node
  # removes those first (cqd_mpi/runtime/shm.py, clear_job); no rank of this start runs yet.
  if [ -n "${SLURM_JOB_ID:-}" ]; then
    srun --nodes="${SLURM_JOB_NUM_NODES:-1}" --ntasks="${SLURM_JOB_NUM_NODES:-1}" --ntasks-per-node=1 \
      --mpi=none --cpu-bind=none python -m cqd_mpi.runtime.shm clear-job "$SLURM_JOB_ID" \
      || echo "cqd_mpi: warning: could not clear the shared-memory segments of earlier starts" >&2
  fi
  srun ${CQD_SRUN_MPI:+--mpi="$CQD_SRUN_MPI"} --kill-on-bad-exit=1 --cpu-bind=none python -m cqd_mpi run "$config" "$@" &
  srun_pid=$!
  if (( signalled )); then kill -USR1 "$srun_pid"; fi
  local status=0
  while true; do
    wait "$srun_pid"
    status=$?
    # wait returns early (status > 128) when a trapped signal arrives; go on waiting for srun.
    if kill -0 "$srun_pid" 2>/dev/null; then continue; fi
    break
  done
  # srun is gone: a late signal (a preemption's SIGTERM) must neither end bash before the
  # requeue nor change what srun's exit decided.
  trap ':' USR1 TERM

  local phase
  phase=$(cqd_phase "$config")
  echo "cqd_mpi: srun exited with $status; run phase: $phase"
  if [ "$phase" = "done" ]; then
    return 0
  fi
  if [ "$status" -ne 0 ] && [ "$signalled" -eq 0 ] && [ -n "$(cqd_lost "$config")" ]; then
    echo "cqd_mpi: ranks were lost (a node failed?), not the run: requeueing job $SLURM_JOB_ID to resume"
    scontrol requeue "$SLURM_JOB_ID"
    return 0
  fi
  if [ "$status" -ne 0 ] && [ "$signalled" -eq 0 ]; then
    echo "cqd_mpi: the run failed (exit $status); not requeueing. Fix the cause and resubmit: it resumes." >&2
    return "$status"
  fi
  echo "cqd_mpi: requeueing job $SLURM_JOB_ID to resume from the checkpoint"
  scontrol requeue "$SLURM_JOB_ID"
  return 0
}
