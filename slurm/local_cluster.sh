#!/usr/bin/env bash
# A real one-node SLURM cluster on localhost from Debian's packages (munge, slurmctld, slurmd, and slurmdbd +
# MariaDB for accounting, so that jobs killed by SLURM are seen by sacct and submitit). Runs as root, without
# systemd; safe to re-run. `stop` stops slurmd, slurmctld, slurmdbd, MariaDB and munged (all of which `start`
# starts), each only through its own pid file (MariaDB through its init script).
#
#   bash slurm/local_cluster.sh start    # install if needed, configure, start, wait for an idle node + srun probe
#   bash slurm/local_cluster.sh status
#   bash slurm/local_cluster.sh stop
#
# Knobs: BENCH_SLURM_PARTITION (default debug), BENCH_SLURM_ACCOUNTING (1: slurmdbd + MariaDB, default; 0: none,
# then a job cancelled by SLURM is never seen as finished by submitit).
# References: Slurm's Quick Start Administrator Guide (https://slurm.schedmd.com/quickstart_admin.html), the
# slurm.conf and slurmdbd.conf manuals (https://slurm.schedmd.com/slurm.conf.html); tested on Debian 12, Slurm 22.05.
set -euo pipefail

PARTITION=${BENCH_SLURM_PARTITION:-debug}
ACCOUNTING=${BENCH_SLURM_ACCOUNTING:-1}
CONF=/etc/slurm/slurm.conf
DBDCONF=/etc/slurm/slurmdbd.conf
LOGDIR=/var/log/slurm
DB_PASS=benchlocal   # local MariaDB account, reachable over the unix socket / loopback only

log() { printf '[local_cluster %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# wait_until SECONDS WHAT CMD...: poll CMD every 0.2 s
wait_until() {
  local limit=$1 what=$2 start=$SECONDS; shift 2
  until "$@" >/dev/null 2>&1; do
    (( SECONDS - start > limit )) && { log "$what: not ready after ${limit} s"; return 1; }
    sleep 0.2
  done
}

# is_running PIDFILE COMM: the pid file names a live process with that command name (a reused pid is not ours)
is_running() {
  local pid
  [ -s "$1" ] || return 1
  pid=$(tr -dc '0-9' < "$1")
  [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]
}

stop_daemon() {
  local pidfile=$1 comm=$2 pid
  if is_running "$pidfile" "$comm"; then
    pid=$(tr -dc '0-9' < "$pidfile")
    log "stopping $comm (pid $pid)"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do [ -d "/proc/$pid" ] || break; sleep 0.2; done
    [ -d "/proc/$pid" ] && kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
}

install_packages() {
  local wanted=(munge slurmctld slurmd slurm-client) missing=()
  [ "$ACCOUNTING" = 1 ] && wanted+=(slurmdbd mariadb-server)
  for p in "${wanted[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return
  log "installing ${missing[*]}"
  apt-get update -qq
  # package scripts must not start daemons with the stock configuration (no systemd here)
  local own_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && own_policy=1
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT   # also when the install is interrupted
  fi
  local rc=0
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" \
    > /tmp/local_cluster_apt.log 2>&1 || rc=$?
  if [ $own_policy = 1 ]; then rm -f /usr/sbin/policy-rc.d; trap - EXIT; fi
  [ $rc = 0 ] || { tail -20 /tmp/local_cluster_apt.log >&2; die "apt-get install failed"; }
}

write_config() {
  local node mem hw new
  node=$(hostname -s)
  getent hosts "$node" >/dev/null || echo "127.0.0.1 $node" >> /etc/hosts
  mem=$(awk '/^MemTotal:/{print int($2 / 1024 * 0.9)}' /proc/meminfo)  # above slurmd's view the node drains
  hw=$(slurmd -C | sed -nE "1{s/^NodeName=[^ ]+/NodeName=$node/; s/RealMemory=[0-9]+/RealMemory=$mem/; p}")
  mkdir -p /etc/slurm "$LOGDIR" /var/spool/slurmctld /var/spool/slurmd
  new=$(mktemp)
  {
    echo "# written by grpo-bench slurm/local_cluster.sh"
    echo "ClusterName=benchlocal"
    echo "SlurmctldHost=$node(127.0.0.1)"
    echo "SlurmUser=root"
    echo "AuthType=auth/munge"
    echo "CredType=cred/munge"
    echo "MpiDefault=none"
    echo "ProctrackType=proctrack/linuxproc"   # no usable cgroups or systemd: track through /proc
    echo "TaskPlugin=task/none"
    echo "JobAcctGatherType=jobacct_gather/none"
    echo "SelectType=select/cons_tres"
    echo "SelectTypeParameters=CR_Core"
    echo "SchedulerType=sched/backfill"
    echo "SchedulerParameters=sched_interval=1"
    echo "ReturnToService=2"
    echo "StateSaveLocation=/var/spool/slurmctld"
    echo "SlurmdSpoolDir=/var/spool/slurmd"
    echo "SlurmctldPidFile=/run/slurmctld.pid"
    echo "SlurmdPidFile=/run/slurmd.pid"
    echo "SlurmctldLogFile=$LOGDIR/slurmctld.log"
    echo "SlurmdLogFile=$LOGDIR/slurmd.log"
    echo "MailProg=/bin/true"
    echo "MinJobAge=300"
    echo "KillWait=5"
    echo "InactiveLimit=0"
    if [ "$ACCOUNTING" = 1 ]; then
      echo "AccountingStorageType=accounting_storage/slurmdbd"
      echo "AccountingStorageHost=127.0.0.1"
      echo "AccountingStoragePort=6819"
    else
      echo "AccountingStorageType=accounting_storage/none"
    fi
    echo "$hw NodeAddr=127.0.0.1 State=UNKNOWN"
    echo "PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
  } > "$new"
  CONF_CHANGED=1
  if cmp -s "$new" "$CONF"; then CONF_CHANGED=0; rm -f "$new"; else install -m 0644 "$new" "$CONF"; rm -f "$new"; fi
  if [ "$ACCOUNTING" = 1 ]; then
    (umask 077; cat > "$DBDCONF" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
LogFile=$LOGDIR/slurmdbd.log
PidFile=/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
    )
  fi
}

munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
mariadb_works() { mariadb-admin --protocol=socket ping >/dev/null 2>&1; }
slurmdbd_listens() { (exec 3<>/dev/tcp/127.0.0.1/6819) 2>/dev/null; }
slurmctld_up() { scontrol ping 2>/dev/null | grep -q 'is UP'; }
node_usable() { case "$(sinfo -h -N -n "$(hostname -s)" -o %T 2>/dev/null | head -n1)" in idle|mixed|allocated) return 0;; esac; return 1; }

start() {
  [ "$(id -u)" = 0 ] || die "run as root"
  local t0=$SECONDS
  install_packages
  write_config
  if ! munge_works; then
    if [ ! -s /etc/munge/munge.key ]; then
      install -d -o munge -g munge -m 0700 /etc/munge
      mungekey --create --force --keyfile=/etc/munge/munge.key
      chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
    fi
    install -d -o munge -g munge -m 0755 /run/munge
    runuser -u munge -- /usr/sbin/munged --force   # --force: over a stale socket of a killed munged
    wait_until 20 munged munge_works || die "munged did not start"
  fi
  if [ "$ACCOUNTING" = 1 ]; then
    mariadb_works || { /etc/init.d/mariadb start >/dev/null; wait_until 60 mariadb mariadb_works || die "mariadb did not start"; }
    mariadb --protocol=socket -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
      CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
      GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
    is_running /run/slurmdbd.pid slurmdbd || slurmdbd
    wait_until 60 slurmdbd slurmdbd_listens || { tail -5 "$LOGDIR/slurmdbd.log" >&2; die "slurmdbd did not start"; }
  fi
  if [ "$CONF_CHANGED" = 1 ]; then  # some keys (accounting) need a restart, not a reconfigure
    stop_daemon /run/slurmd.pid slurmd
    stop_daemon /run/slurmctld.pid slurmctld
  fi
  is_running /run/slurmctld.pid slurmctld || slurmctld
  wait_until 60 slurmctld slurmctld_up || { tail -5 "$LOGDIR/slurmctld.log" >&2; die "slurmctld did not start"; }
  is_running /run/slurmd.pid slurmd || slurmd -N "$(hostname -s)"
  if ! wait_until 60 "node idle" node_usable; then
    scontrol update NodeName="$(hostname -s)" State=RESUME || true
    wait_until 30 "node idle" node_usable || { sinfo -R >&2; die "node not usable"; }
  fi
  # sinfo may show the saved state before slurmd registered: prove the path with a real step
  timeout 120 srun -N1 -n1 true || die "srun probe failed"
  log "cluster up in $((SECONDS - t0)) s (partition $PARTITION, accounting $ACCOUNTING)"
}

stop() {
  stop_daemon /run/slurmd.pid slurmd
  stop_daemon /run/slurmctld.pid slurmctld
  stop_daemon /run/slurmdbd.pid slurmdbd
  if mariadb_works; then /etc/init.d/mariadb stop >/dev/null || true; fi
  stop_daemon /run/munge/munged.pid munged
}

status() {
  for entry in /run/munge/munged.pid:munged /run/slurmdbd.pid:slurmdbd /run/slurmctld.pid:slurmctld /run/slurmd.pid:slurmd; do
    if is_running "${entry%%:*}" "${entry##*:}"; then echo "${entry##*:}: running"; else echo "${entry##*:}: stopped"; fi
  done
  sinfo 2>/dev/null || true
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
