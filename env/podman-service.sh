#!/bin/sh
# Start podman's Docker-compatible API socket (for the docker SDK) and print the DOCKER_HOST to use.
#
#   export DOCKER_HOST="$(env/podman-service.sh)"
#
# Idempotent: configures /etc/containers/containers.conf only when it is missing, and reuses a
# service that already answers on the socket. Installs podman and runc with apt-get when absent.
# CQD_PODMAN_SOCKET overrides the socket path (default /tmp/podman.sock).
set -eu

socket="${CQD_PODMAN_SOCKET:-/tmp/podman.sock}"
conf=/etc/containers/containers.conf
log="${socket%.sock}.log"

say() { echo "podman-service: $*" >&2; }

ping_socket() {
    [ -S "$socket" ] && curl -fsS --max-time 2 --unix-socket "$socket" http://d/_ping >/dev/null 2>&1
}

# A service whose working directory was deleted (started from a checkout that is gone)
# still answers pings, but conmon cannot start containers from it ("Failed to get working
# directory"): stop it and start a new one.
for pid in $(pgrep -f "podman system service --time=0 unix://$socket" 2>/dev/null || true); do
    case "$(readlink "/proc/$pid/cwd" 2>/dev/null)" in
        *" (deleted)")
            say "restarting the service (pid $pid): its working directory was deleted"
            kill "$pid" 2>/dev/null || true
            waited=0
            while kill -0 "$pid" 2>/dev/null \
                && [ "$(cut -d' ' -f3 "/proc/$pid/stat" 2>/dev/null)" != Z ]; do
                waited=$((waited + 1))
                if [ "$waited" -ge 100 ]; then
                    kill -9 "$pid" 2>/dev/null || true
                    break
                fi
                sleep 0.1
            done
            ;;
    esac
done

if ping_socket; then
    echo "unix://$socket"
    exit 0
fi

if ! command -v podman >/dev/null 2>&1 || ! command -v runc >/dev/null 2>&1; then
    say "installing podman and runc with apt-get"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q podman runc >/dev/null
fi

if [ ! -e "$conf" ]; then
    mkdir -p "$(dirname "$conf")"
    cat >"$conf" <<'CONF'
# Written by cqd_mpi env/podman-service.sh: no ulimit overrides, runc as the OCI runtime.
[containers]
default_ulimits = []

[engine]
runtime = "runc"
CONF
elif ! grep -q '^[[:space:]]*runtime[[:space:]]*=[[:space:]]*"runc"' "$conf" \
    || ! grep -q '^[[:space:]]*default_ulimits[[:space:]]*=[[:space:]]*\[\]' "$conf"; then
    say "$conf exists but lacks the settings podman needs here; add"
    say '  [containers] default_ulimits = []   and   [engine] runtime = "runc"'
    exit 1
fi

rm -f "$socket"
(cd / && nohup podman system service --time=0 "unix://$socket" >"$log" 2>&1 &)

tries=0
until ping_socket; do
    tries=$((tries + 1))
    if [ "$tries" -ge 100 ]; then
        say "the podman service did not answer on $socket within 10 s; its log ($log):"
        tail -n 20 "$log" >&2 || true
        exit 1
    fi
    sleep 0.1
done
echo "unix://$socket"
