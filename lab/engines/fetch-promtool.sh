#!/usr/bin/env bash
# promtool (the alert rules' unit tests) from Debian's prometheus package, extracted into $1: the package itself is
# not installed, since installing it starts a Prometheus server on a systemd host.
set -euo pipefail
out=$(realpath -m "$1")
[ -x "$out/promtool" ] && exit 0
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download -qq prometheus 2>/dev/null) || (apt-get update -qq && cd "$work" && apt-get download -qq prometheus)
dpkg-deb -x "$work"/prometheus_*.deb "$work/root"
mkdir -p "$out"
cp "$work/root/usr/bin/promtool" "$out/"
"$out/promtool" --version | head -n1
