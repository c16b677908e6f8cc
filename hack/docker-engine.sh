#!/usr/bin/env bash
# Make sure a Docker engine answers: use the running one, or start dockerd (as root, with the
# settings these machines need: no iptables, no default bridge; containers use the host network).
# Installs docker.io with apt when dockerd is missing and we are root. Exit 3: no engine can be had.
set -euo pipefail
DATA_ROOT=${DOCKER_DATA_ROOT:-/var/lib/docker}
if docker info >/dev/null 2>&1 && command -v debootstrap >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" != 0 ]; then
  if docker info >/dev/null 2>&1; then exit 0; fi  # no debootstrap: only real bases can be built
  echo "docker-engine: no Docker engine answers and not root to start one" >&2; exit 3
fi
need=()
command -v dockerd >/dev/null 2>&1 || need+=(docker.io iptables)
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)  # stand-in bases (hack/images.sh)
if ((${#need[@]})); then
  echo "docker-engine: apt-get install ${need[*]}" >&2
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      "${need[@]}"; } >/dev/null 2>&1 || { echo "docker-engine: cannot install ${need[*]}" >&2; exit 3; }
fi
if docker info >/dev/null 2>&1; then exit 0; fi
mkdir -p "$DATA_ROOT"
nohup dockerd --iptables=false --bridge=none --storage-driver=overlay2 --data-root "$DATA_ROOT" \
  >/tmp/selflearn-dockerd.log 2>&1 &
for _ in $(seq 60); do
  if docker info >/dev/null 2>&1; then exit 0; fi
  sleep 0.5
done
echo "docker-engine: dockerd did not start (see /tmp/selflearn-dockerd.log: $(tail -1 /tmp/selflearn-dockerd.log))" >&2
exit 3
