#!/usr/bin/env bash
# Makes sure a Docker engine runs here: installs Debian's docker.io, debootstrap and docker-compose when absent and
# starts dockerd when nothing answers on its socket (CI machines start bare).
set -euo pipefail
need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v docker-compose >/dev/null || need+=(docker-compose)
if ((${#need[@]})); then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
docker info >/dev/null 2>&1 && exit 0
mkdir -p /var/log/loraplex
nohup dockerd >/var/log/loraplex/dockerd.log 2>&1 &
for _ in $(seq 60); do
    docker info >/dev/null 2>&1 && exit 0
    sleep 1
done
echo "dockerd did not answer within 60 s; its log: /var/log/loraplex/dockerd.log" >&2
exit 1
