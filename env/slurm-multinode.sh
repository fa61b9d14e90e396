#!/bin/bash
# A SLURM cluster of several nodes on this one machine, for the multi-node job tests:
#
#   eval "$(env/slurm-multinode.sh)"        # start (idempotent), print SLURM_CONF and PATH
#   env/slurm-multinode.sh stop             # stop every daemon and job, remove the namespaces
#   env/slurm-multinode.sh kill-node cqd-n2 # kill -9 every process of that node (a crash)
#
# Each node is a network namespace (its own loopback and eth0, joined to the others by a
# bridge in the head's namespace) with its own hostname (UTS namespace), its own /dev/shm
# (a directory of the state dir, so that it outlives a crash as a node's tmpfs outlives a
# killed slurmd) and its own slurmd (NodeName and NodeAddr per node). The head namespace
# runs slurmctld; munged and the filesystem are shared, as a cluster's shared filesystem is.
# Addresses exist only inside these namespaces (CQD_SLURM_MN_NET.0/24), so the machine's own
# network is not touched; the SLURM commands of the printed PATH (sbatch, scontrol, ...) run
# in the head's namespace when called from outside the cluster. env/README.md says what this
# simulates and what not. Needs root, iproute2 and util-linux's unshare; installs slurm-wlm
# and munge with apt-get when absent.
#
#   CQD_SLURM_MN_STATE  state, spool, per-node /dev/shm and logs (default /var/lib/cqd-slurm-mn)
#   CQD_SLURM_MN_NODES  number of compute nodes (default 3): cqd-n1, cqd-n2, ...
#   CQD_SLURM_MN_NET    the first three octets of the cluster's network (default 10.77.0)
#   CQD_SLURM_MN_CPUS   CPUs each node declares (default 4, whatever the machine has: the nodes
#                       share its cores, and tests run several jobs at once)
set -euo pipefail

action=${1:-start}
state=${CQD_SLURM_MN_STATE:-/var/lib/cqd-slurm-mn}
n_nodes=${CQD_SLURM_MN_NODES:-3}
net=${CQD_SLURM_MN_NET:-10.77.0}
cpus=${CQD_SLURM_MN_CPUS:-4}
conf=$state/slurm.conf
ns_prefix=cqdmn
marker="# Written by cqd_mpi env/slurm-multinode.sh"

say() { echo "slurm-multinode: $*" >&2; }
die() { say "$*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "needs root (network namespaces, munged, slurmctld, slurmd)"
[[ "$n_nodes" =~ ^[1-9][0-9]?$ ]] || die "CQD_SLURM_MN_NODES: expected 1 to 99 nodes, got '$n_nodes'"

nodes=()
for i in $(seq "$n_nodes"); do nodes+=("cqd-n$i"); done
ns_of() { echo "$ns_prefix-${1#cqd-}"; }   # cqd-head -> cqdmn-head, cqd-n1 -> cqdmn-n1
addr_of() { if [ "$1" = cqd-head ]; then echo "$net.1"; else echo "$net.$(( 10 + ${1#cqd-n} ))"; fi; }

pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

kill_namespace() {
  # kill -9 every process whose network namespace is this one (a node's crash), and wait.
  local ns=$1 pids
  ip netns list 2>/dev/null | grep -qw "^$ns" || return 0
  for _ in $(seq 50); do
    pids=$(ip netns pids "$ns" 2>/dev/null || true)
    [ -n "$pids" ] || return 0
    # shellcheck disable=SC2086
    kill -9 $pids 2>/dev/null || true
    sleep 0.1
  done
  die "processes of $ns survive kill -9: $(ip netns pids "$ns" | tr '\n' ' ')"
}

case "$action" in
  start) ;;
  stop)
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^$ns_prefix-" || true); do
      kill_namespace "$ns"
      ip netns del "$ns"
    done
    rm -f "$state"/*.pid
    say "stopped; state kept in $state"
    exit 0 ;;
  kill-node)
    node=${2:?usage: env/slurm-multinode.sh kill-node NODE}
    printf '%s\n' "${nodes[@]}" | grep -qx "$node" || die "no node '$node' (nodes: ${nodes[*]})"
    kill_namespace "$(ns_of "$node")"
    # As a site's health check would: nothing new is scheduled on it (its jobs keep running, as
    # far as slurmctld knows, until SlurmdTimeout) until it comes back.
    ip netns exec "$(ns_of cqd-head)" scontrol update NodeName="$node" State=DRAIN \
      Reason="killed by env/slurm-multinode.sh kill-node" 2>/dev/null || true
    say "killed every process of $node and drained it; \`env/slurm-multinode.sh\` brings it back"
    exit 0 ;;
  *) die "unknown action '$action': expected start, stop or kill-node NODE" ;;
esac

for tool in ip unshare nsenter; do command -v "$tool" >/dev/null || die "needs $tool (iproute2, util-linux)"; done
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
    || ! command -v sbatch >/dev/null; then
  say "installing slurm-wlm and munge with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null \
    || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null; } \
    || die "apt-get install slurm-wlm munge failed"
fi

# --- munge (shared by every node, as one key is on a real cluster): as env/slurm-cluster.sh.
munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
if ! munge_ok; then
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
  (cd / && runuser -u munge -- /usr/sbin/munged --force) || die "munged did not start (see /var/log/munge/munged.log)"
  for _ in $(seq 50); do munge_ok && break; sleep 0.1; done
  munge_ok || die "munged started but munge -n | unmunge fails"
fi

# --- the network: a bridge in the head's namespace, one veth pair per node.
ensure_ns() { ip netns list | grep -qw "^$1" || ip netns add "$1"; ip -n "$1" link set lo up; }
head_ns=$(ns_of cqd-head)
ensure_ns "$head_ns"
if ! ip -n "$head_ns" link show br0 >/dev/null 2>&1; then
  ip -n "$head_ns" link add br0 type bridge
  ip -n "$head_ns" addr add "$(addr_of cqd-head)/24" dev br0
fi
ip -n "$head_ns" link set br0 up
for node in "${nodes[@]}"; do
  ns=$(ns_of "$node")
  ensure_ns "$ns"
  if ! ip -n "$ns" link show eth0 >/dev/null 2>&1; then
    tmp=${ns_prefix}tmp$$
    ip link add "$tmp" type veth peer name "${tmp}p"
    ip link set "$tmp" netns "$ns"
    ip -n "$ns" link set "$tmp" name eth0
    ip -n "$ns" addr add "$(addr_of "$node")/24" dev eth0
    ip link set "${tmp}p" netns "$head_ns"
    ip -n "$head_ns" link set "${tmp}p" name "${node#cqd-}"
    ip -n "$head_ns" link set "${node#cqd-}" master br0
  fi
  ip -n "$ns" link set eth0 up
  ip -n "$head_ns" link set "${node#cqd-}" up
done

# --- files: /etc/hosts of the cluster (bound over /etc/hosts in every namespace), slurm.conf,
# and the SLURM commands that run in the head's namespace from outside the cluster.
install -d -o slurm -g slurm "$state" "$state/ctld" "$state/log"
install -d "$state/bin" "$state/nodes"
{
  echo "127.0.0.1 localhost"
  for node in cqd-head "${nodes[@]}"; do echo "$(addr_of "$node") $node"; done
} > "$state/hosts"
for node in "${nodes[@]}"; do install -d -m 1777 "$state/nodes/$node/shm"; install -d "$state/nodes/$node/spool"; done

memory=$(slurmd -C | head -n 1 | grep -o 'RealMemory=[0-9]*')
node_lines=""
for node in "${nodes[@]}"; do
  node_lines+="NodeName=$node NodeHostname=$node NodeAddr=$(addr_of "$node") CPUs=$cpus $memory State=UNKNOWN"$'\n'
done
# What differs from the one-node cluster (env/slurm-conf.sh has the rest).
extra=$(cat <<CONF
# Each node declares CQD_SLURM_MN_CPUS CPUs, not what slurmd finds (the machine's, shared).
SlurmdParameters=config_overrides
# A crashed node is DOWN (its jobs ended and requeued) SlurmdTimeout s after its slurmd stops
# answering: SLURM's default, later than cqd_mpi's own lost-ranks deadline in the tests.
SlurmdTimeout=300
# Two cores run every node's daemons and jobs: at the default 10 s, launches and PMI exchanges
# timed out under load and srun cancelled steps that were starting.
MessageTimeout=60
# Every task gets MPICH's OFI netmod with the tcp provider on eth0 from here (env/README.md:
# UCX, the wheel's default, moved bytes between the "nodes" through shared memory, one kernel,
# and its address exchange ran through slurm's PMI-1 parser in pieces that it garbled).
TaskProlog=$state/task-prolog.sh
CONF
)
# shellcheck source=env/slurm-conf.sh
source "$(dirname "${BASH_SOURCE[0]}")/slurm-conf.sh"
# Jobs go to the least loaded node (CR_LLN), so that a job array spreads over the nodes.
new_conf=$(slurm_conf "$marker: a ${n_nodes}-node test cluster in network namespaces." cqdmn \
  "cqd-head($(addr_of cqd-head))" "$state" "$state/nodes/%n/spool" "$state/slurmd-%n.pid" \
  "$state/log/slurmd-%n.log" CR_CPU,CR_LLN "$extra" "${node_lines%$'\n'}" "cqd-n[1-$n_nodes]")
printf '%s\n' '#!/bin/sh' '# env/slurm-multinode.sh: between nodes, MPI bytes go over TCP (eth0), never shared memory.' \
  'for v in MPIR_CVAR_CH4_NETMOD=ofi FI_PROVIDER=tcp FI_TCP_IFACE=eth0 UCX_TLS=tcp,self; do echo "export $v"; done' \
  > "$state/task-prolog.sh"
chmod 755 "$state/task-prolog.sh"
changed=0
if [ "$(cat "$conf" 2>/dev/null)" != "$new_conf" ]; then
  printf '%s\n' "$new_conf" > "$conf"
  changed=1
fi
export SLURM_CONF=$conf
for cmd in sbatch srun salloc scontrol scancel sinfo squeue sacct; do
  real=$(PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin command -v "$cmd") || continue
  cat > "$state/bin/$cmd.tmp" <<WRAP
#!/bin/sh
# env/slurm-multinode.sh: $cmd on the cluster's head node when called from outside the cluster.
if [ -n "\$(ip netns identify 2>/dev/null)" ]; then exec $real "\$@"; fi
exec ip netns exec $head_ns $real "\$@"
WRAP
  chmod +x "$state/bin/$cmd.tmp" && mv "$state/bin/$cmd.tmp" "$state/bin/$cmd"
done

in_node() {
  # Run a command (a daemon) on NODE: its network namespace, its hostname, the cluster's
  # /etc/hosts, and for compute nodes its own /dev/shm.
  local node=$1
  shift
  local shm=""
  [ "$node" = cqd-head ] || shm=$state/nodes/$node/shm
  # nsenter, not ip netns exec: that remounts /sys without the cgroup mounts slurmd looks for.
  nsenter --net="/run/netns/$(ns_of "$node")" unshare --uts --mount --propagation private -- /bin/sh -c '
    hostname "$1" && mount --bind "$2" /etc/hosts || exit 1
    if [ -n "$3" ]; then mount --bind "$3" /dev/shm || exit 1; fi
    shift 3; cd / && exec "$@"' in_node "$node" "$state/hosts" "$shm" "$@"
}

stop_pidfile() {
  local pidfile=$1 pid
  if pid_alive "$pidfile"; then
    pid=$(cat "$pidfile")
    kill "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
}
if (( changed )); then
  for node in "${nodes[@]}"; do stop_pidfile "$state/slurmd-$node.pid"; done
  stop_pidfile "$state/slurmctld.pid"
fi

# --- the daemons.
ping_ctld() { ip netns exec "$head_ns" scontrol ping 2>/dev/null | grep -q UP; }
fresh_ctld=0
if ! pid_alive "$state/slurmctld.pid" || ! ping_ctld; then
  stop_pidfile "$state/slurmctld.pid"
  fresh_ctld=1
  in_node cqd-head slurmctld -c || die "slurmctld did not start; its log: $state/log/slurmctld.log"
  for _ in $(seq 100); do ping_ctld && break; sleep 0.2; done
  ping_ctld || { tail -n 20 "$state/log/slurmctld.log" >&2; die "slurmctld does not answer"; }
fi
for node in "${nodes[@]}"; do
  if ! pid_alive "$state/slurmd-$node.pid"; then
    # A crashed node reboots empty (its processes may linger in its namespace), and slurmctld
    # has seen it go DOWN by then: a node back before that kept its dead job steps in the
    # controller's books, and a requeued job's step of the same id was killed on it.
    ip netns exec "$head_ns" scontrol update NodeName="$node" State=DOWN \
      Reason="slurmd not running: restarted by env/slurm-multinode.sh" 2>/dev/null || true
    kill_namespace "$(ns_of "$node")"
    # A fresh controller (slurmctld -c) counts job ids from 1 again: the whole cluster boots,
    # and a node's /dev/shm (a directory here, not a tmpfs) is emptied as a reboot would. A node
    # restarted alone keeps it, as a node whose processes were killed does.
    if (( fresh_ctld )); then find "$state/nodes/$node/shm" -mindepth 1 -delete; fi
    in_node "$node" slurmd -N "$node" || { tail -n 20 "$state/log/slurmd-$node.log" >&2; die "slurmd of $node did not start"; }
  fi
done

# --- every node idle (or busy with jobs) before anything is submitted.
node_state() { ip netns exec "$head_ns" sinfo -h -n "$1" -o %T 2>/dev/null | head -n 1; }
for node in "${nodes[@]}"; do
  for _ in $(seq 300); do
    case "$(node_state "$node")" in
      idle|mixed|allocated|completing) break ;;
      down*|drain*|fail*) ip netns exec "$head_ns" scontrol update NodeName="$node" State=RESUME 2>/dev/null || true ;;
    esac
    sleep 0.2
  done
  case "$(node_state "$node")" in
    idle|mixed|allocated|completing) ;;
    *) tail -n 20 "$state/log/slurmd-$node.log" >&2
       die "node $node is $(node_state "$node"); its slurmd log above" ;;
  esac
done
say "${n_nodes}-node cluster up: nodes ${nodes[*]} ($(addr_of cqd-n1) ...), head cqd-head ($(addr_of cqd-head)), partition cqd, logs in $state/log"
echo "export SLURM_CONF=$conf"
echo "export PATH=$state/bin:\$PATH"
