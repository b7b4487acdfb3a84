#!/usr/bin/env bash
# Finds or installs Prometheus for the e2e tests and prints the directory holding `prometheus`
# and `promtool` as its last stdout line.
#
# Order: LOCALMODEL_PROMETHEUS_BIN (a directory), then `prometheus` on PATH, then Debian's
# `prometheus` package unpacked into the cache (apt-get download + dpkg-deb -x: nothing is
# installed system-wide, no service is started). Safe to run concurrently.
set -euo pipefail

if [[ -n "${LOCALMODEL_PROMETHEUS_BIN:-}" ]]; then
  echo "$LOCALMODEL_PROMETHEUS_BIN"
  exit 0
fi
if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
  dirname "$(command -v prometheus)"
  exit 0
fi

cache="${LOCALMODEL_CACHE:-$HOME/.cache/localmodel}/prometheus"
mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9

version=$(apt-cache policy prometheus 2>/dev/null | awk '/Candidate:/ {print $2}')
if [[ -z "$version" || "$version" == "(none)" ]]; then
  echo "install.sh: apt knows no prometheus package; running apt-get update" >&2
  apt-get update >&2
  version=$(apt-cache policy prometheus | awk '/Candidate:/ {print $2}')
fi
if [[ -z "$version" || "$version" == "(none)" ]]; then
  echo "install.sh: no Debian prometheus package available (set LOCALMODEL_PROMETHEUS_BIN)" >&2
  exit 1
fi
dest="$cache/${version//[^A-Za-z0-9.+~-]/_}"
if [[ -x "$dest/usr/bin/prometheus" && -x "$dest/usr/bin/promtool" ]]; then
  echo "$dest/usr/bin"
  exit 0
fi

work=$(mktemp -d "$cache/tmp.XXXXXX")
trap 'rm -rf "$work"' EXIT
echo "install.sh: downloading Debian's prometheus $version" >&2
if ! (cd "$work" && apt-get download "prometheus=$version" >&2); then
  apt-get update >&2
  (cd "$work" && apt-get download "prometheus=$version" >&2)
fi
dpkg-deb -x "$work"/prometheus_*.deb "$work/root"
rm -rf "$dest"
mv "$work/root" "$dest"
"$dest/usr/bin/prometheus" --version >&2
echo "$dest/usr/bin"
