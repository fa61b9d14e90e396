# Sourced by env/slurm-cluster.sh and env/slurm-multinode.sh: the slurm.conf of both test
# clusters, one source for what they share (no cgroups, no accounting, cred_expire=5,
# sched_interval=2, requeue, ReturnToService=2). Each passes what differs:
#
#   slurm_conf MARKER CLUSTER CTLD_HOST STATE SLURMD_SPOOL SLURMD_PID SLURMD_LOG SELECT EXTRA NODES PARTITION
#
# MARKER the first line; CLUSTER ClusterName; CTLD_HOST SlurmctldHost; STATE the state dir
# (controller state, pid, logs); SLURMD_* the slurmd paths (%n: the node's name);
# SELECT SelectTypeParameters; EXTRA settings of that cluster alone (lines); NODES the NodeName
# lines; PARTITION the partition's Nodes=.
slurm_conf() {
  local marker=$1 cluster=$2 ctld=$3 state=$4 spool=$5 pidfile=$6 logfile=$7 select=$8 extra=$9 nodes=${10} partition=${11}
  cat <<CONF
$marker
ClusterName=$cluster
SlurmctldHost=$ctld
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job may start again cred_expire + 1 s after it left (default 120 s).
AuthInfo=cred_expire=5
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$state/log/jobcomp.txt
SelectType=select/cons_tres
SelectTypeParameters=$select
SchedulerType=sched/builtin
# Pending jobs (a requeued one waiting out its begin time) are looked at every 2 s, not 60.
SchedulerParameters=sched_interval=2
JobRequeue=1
# A node whose slurmd comes back (after a crash) returns to service by itself.
ReturnToService=2
# Finished jobs stay visible to scontrol show job for 10 minutes.
MinJobAge=600
KillWait=10
MailProg=/bin/true
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$spool
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$pidfile
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$logfile
SlurmctldDebug=info
SlurmdDebug=info
${extra}
${nodes}
PartitionName=cqd Nodes=$partition Default=YES MaxTime=INFINITE State=UP
CONF
}
