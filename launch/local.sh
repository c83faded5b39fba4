#!/usr/bin/env bash
# N training processes on this machine, as if on N hosts: a coordinator on 127.0.0.1 (free port),
# each process with D simulated CPU devices (or the real ones with -d 0). Waits for all; if one
# fails the others are stopped and the script fails. SIGTERM/SIGINT are forwarded (preemption).
#
#   launch/local.sh N [-d DEVICES_PER_PROCESS] [-l LOG_DIR] -- <bgjax train args>
#   launch/local.sh 2 -d 2 -- --config synthetic.py:size=tiny --workdir runs/mp
#
# Process i's output is prefixed "[i] " (or written to LOG_DIR/process_i.log with -l).
# PYTHON (default: python) runs `-m bgjax.cli train`.
set -euo pipefail

usage() { echo "usage: $0 N [-d DEVICES_PER_PROCESS] [-l LOG_DIR] -- <bgjax train args>" >&2; exit 2; }
[[ $# -ge 1 && $1 =~ ^[1-9][0-9]*$ ]] || usage
num_processes=$1; shift
devices=1
log_dir=""
while [[ $# -gt 0 && $1 != "--" ]]; do
  case $1 in
    -d) devices=$2; shift 2 ;;
    -l) log_dir=$2; shift 2 ;;
    *) usage ;;
  esac
done
[[ $# -gt 0 ]] && shift  # the "--"
[[ $devices =~ ^[0-9]+$ ]] || usage
python=${PYTHON:-$(command -v python || command -v python3)}

port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
xla_flags=${XLA_FLAGS:-}
if [[ $devices -gt 0 ]]; then
  xla_flags="$xla_flags --xla_force_host_platform_device_count=$devices"
  export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
fi
[[ -n $log_dir ]] && mkdir -p "$log_dir"

pids=()
stop_all() { kill -TERM "${pids[@]}" 2>/dev/null || true; }
trap 'stop_all' TERM INT

for ((i = 0; i < num_processes; i++)); do
  (
    export BGJAX_COORDINATOR="127.0.0.1:$port" BGJAX_NUM_PROCESSES=$num_processes \
      BGJAX_PROCESS_ID=$i XLA_FLAGS="$xla_flags"
    if [[ -n $log_dir ]]; then
      exec "$python" -m bgjax.cli train "$@" >"$log_dir/process_$i.log" 2>&1
    else
      exec "$python" -m bgjax.cli train "$@" > >(sed -u "s/^/[$i] /") 2>&1
    fi
  ) &
  pids+=($!)
done

status=0
remaining=$num_processes
while ((remaining > 0)); do
  finished="" rc=0
  wait -n -p finished || rc=$?
  [[ -z ${finished:-} ]] && continue  # wait was interrupted by a forwarded signal: keep waiting
  remaining=$((remaining - 1))
  if ((rc != 0 && status == 0)); then
    echo "local.sh: process with pid $finished exited with status $rc; stopping the others" >&2
    status=1
    stop_all  # the rest would block in collectives forever
  fi
done
exit $status
