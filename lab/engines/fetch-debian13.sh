#!/usr/bin/env bash
# Debian 13's Docker for the lab's engine matrix, extracted into $1/bin: dockerd 26.1 (dockerd, docker-proxy;
# docker-init is the system's tini) and Compose v2 2.26 (docker-compose, the Go program `docker compose` runs; Debian
# 12 has only Compose v1). Fetched with apt-get download through a sources list and state folders of its own:
# nothing is installed into the system, whose apt sources stay as they are. The mirror is this machine's own.
set -euo pipefail
out=$(realpath -m "$1")
[ -x "$out/bin/dockerd" ] && [ -x "$out/bin/docker-compose" ] && exit 0
mirror=$(sed -n 's/^URIs: *\([^ ]*\).*/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v security | head -n1)
[ -n "$mirror" ] || mirror=$(awk '$1 == "deb" && $3 !~ /security/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null)
[ -n "$mirror" ] || { echo "fetch-debian13: no Debian mirror found in /etc/apt" >&2; exit 1; }
work="$out.apt"
rm -rf "$work" && mkdir -p "$work/lists/partial" "$work/cache/archives/partial"
echo "deb $mirror trixie main" > "$work/sources.list"
apt=(-o "Dir::Etc::SourceList=$work/sources.list" -o Dir::Etc::SourceParts=/dev/null
     -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache" -o APT::Sandbox::User=root)
apt-get "${apt[@]}" update -qq
(cd "$work" && apt-get "${apt[@]}" download -qq docker.io docker-compose)
for deb in "$work"/*.deb; do dpkg-deb -x "$deb" "$work/root"; done
mkdir -p "$out/bin"
cp "$work/root/usr/sbin/dockerd" "$work/root/usr/sbin/docker-proxy" \
   "$work/root/usr/libexec/docker/cli-plugins/docker-compose" "$out/bin/"
rm -rf "$work"
"$out/bin/dockerd" --version
"$out/bin/docker-compose" version
