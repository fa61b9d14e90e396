#!/bin/bash
# Start a one-node SLURM cluster on this machine (munged, slurmctld, slurmd) for the job
# tests, and print the environment that jobs submitted to it need:
#
#   eval "$(env/slurm-cluster.sh)"        # then: sbatch jobs/single-node.sbatch config.yaml
#
# Idempotent: daemons that already answer are kept, and restarted only when the slurm.conf
# written here changed. Needs root; installs slurm-wlm and munge with apt-get when absent.
# No cgroups (proctrack/linuxproc, task/none), so it runs in containers too. The node gets
# this machine's CPUs and memory (slurmd -C) and no GPUs; partition "cqd" is the default.
#
#   CQD_SLURM_CONF   where to write slurm.conf (default /etc/slurm/slurm.conf, where the
#                    client commands look; another path needs SLURM_CONF, which is printed)
#   CQD_SLURM_STATE  state and spool dirs (default /var/lib/cqd-slurm), logs in its log/
set -euo pipefail

conf=${CQD_SLURM_CONF:-/etc/slurm/slurm.conf}
state=${CQD_SLURM_STATE:-/var/lib/cqd-slurm}
marker="# Written by cqd_mpi env/slurm-cluster.sh"

say() { echo "slurm-cluster: $*" >&2; }
die() { say "$*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "needs root (it starts munged, slurmctld and slurmd)"

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
    || ! command -v sbatch >/dev/null; then
  say "installing slurm-wlm and munge with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null \
    || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null; } \
    || die "apt-get install slurm-wlm munge failed"
fi
export SLURM_CONF=$conf

# --- munge: authenticates every message between the SLURM commands and daemons.
munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
if ! munge_ok; then
  if [ ! -s /etc/munge/munge.key ]; then
    say "creating /etc/munge/munge.key"
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
  (cd / && runuser -u munge -- /usr/sbin/munged --force) || die "munged did not start (see /var/log/munge/munged.log)"
  for _ in $(seq 50); do munge_ok && break; sleep 0.1; done
  munge_ok || die "munged started but munge -n | unmunge fails (see /var/log/munge/munged.log)"
fi

# --- slurm.conf: the smallest cluster that runs, requeues and signals jobs as a site does.
node=$(slurmd -C | head -n 1)   # NodeName=HOST CPUs=.. Boards=.. ... RealMemory=..
host=$(hostname -s)
case "$node" in
  "NodeName=$host "*) ;;
  *) die "slurmd -C printed an unexpected line: $node" ;;
esac
install -d -o slurm -g slurm "$state" "$state/ctld" "$state/d" "$state/log"
# shellcheck source=env/slurm-conf.sh
source "$(dirname "${BASH_SOURCE[0]}")/slurm-conf.sh"
new_conf=$(slurm_conf "$marker: a one-node test cluster." cqd "$host(127.0.0.1)" "$state" "$state/d" \
  "$state/slurmd.pid" "$state/log/slurmd.log" CR_CPU "" "$node NodeAddr=127.0.0.1 State=UNKNOWN" "$host")
changed=0
if [ -e "$conf" ] && ! grep -qF "$marker" "$conf"; then
  die "$conf exists and was not written by this script; set CQD_SLURM_CONF to another path"
fi
if [ "$(cat "$conf" 2>/dev/null)" != "$new_conf" ]; then
  mkdir -p "$(dirname "$conf")"
  printf '%s\n' "$new_conf" > "$conf"
  changed=1
fi

pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
stop_daemon() {
  local pidfile=$1
  if pid_alive "$pidfile"; then
    local pid
    pid=$(cat "$pidfile")
    kill "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
  rm -f "$pidfile"
}
if (( changed )); then
  stop_daemon "$state/slurmd.pid"
  stop_daemon "$state/slurmctld.pid"
fi

# --- the daemons; started from / so that a deleted checkout cannot pull the rug.
if ! pid_alive "$state/slurmctld.pid" || ! scontrol ping >/dev/null 2>&1; then
  stop_daemon "$state/slurmctld.pid"
  # -c: a fresh controller forgets the jobs of an earlier one (their files may be gone).
  (cd / && slurmctld -c) || die "slurmctld did not start; its log: $state/log/slurmctld.log"
  for _ in $(seq 100); do scontrol ping >/dev/null 2>&1 && break; sleep 0.2; done
  scontrol ping >/dev/null 2>&1 || { tail -n 20 "$state/log/slurmctld.log" >&2; die "slurmctld does not answer"; }
fi
if ! pid_alive "$state/slurmd.pid"; then
  (cd / && slurmd) || { tail -n 20 "$state/log/slurmd.log" >&2; die "slurmd did not start"; }
fi

# --- the node must be idle (or busy with jobs) before anything is submitted.
node_state() { sinfo -h -n "$host" -o %T 2>/dev/null | head -n 1; }
for _ in $(seq 100); do
  case "$(node_state)" in
    idle|mixed|allocated|completing) break ;;
    down*|drain*|fail*) scontrol update NodeName="$host" State=RESUME 2>/dev/null || true ;;
  esac
  sleep 0.2
done
case "$(node_state)" in
  idle|mixed|allocated|completing) ;;
  *) tail -n 20 "$state/log/slurmd.log" >&2
     die "node $host is $(node_state) ($(sinfo -h -n "$host" -o %E)); slurmd log above" ;;
esac
say "one-node cluster up: node $host ($(sinfo -h -n "$host" -o '%c CPUs, %m MB')), partition cqd, logs in $state/log"
echo "export SLURM_CONF=$conf"
