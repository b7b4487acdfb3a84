#!/usr/bin/env bash
# Builds the e2e control-plane binaries (kube-apiserver, etcd, helm) from the
# Go wrapper modules beside this script, into a cache directory outside the
# repository:
#
#   ${LOCALMODEL_CACHE:-$HOME/.cache/localmodel}/controlplane/<key>/bin/{kube-apiserver,etcd,helm}
#
# <key> is the sha256 of the wrapper modules' go.mod, go.sum and *.go files and
# of this script's RECIPE number, so a version bump gives a new directory and an
# unchanged tree reuses the old one. The last line on stdout is the bin
# directory; everything else goes to stderr. Safe to run concurrently (flock).
set -euo pipefail

# Bump when the way binaries are built changes (flags, ldflags, layout).
RECIPE=1

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
modules=(kube-apiserver etcd helm)

log() { printf '[controlplane/build.sh] %s\n' "$*" >&2; }

if ! command -v go >/dev/null 2>&1 && [ -x /usr/local/go/bin/go ]; then
  export PATH="/usr/local/go/bin:$PATH"
fi
command -v go >/dev/null 2>&1 || { log "go is not installed (need Go >= 1.26)"; exit 1; }

key="$(
  cd "$here"
  {
    printf 'recipe=%s\n' "$RECIPE"
    for m in "${modules[@]}"; do
      for f in "$m"/go.mod "$m"/go.sum "$m"/*.go; do
        [ -f "$f" ] || continue
        printf '== %s\n' "$f"
        cat "$f"
      done
    done
  } | sha256sum | cut -d' ' -f1
)"

cache_root="${LOCALMODEL_CACHE:-$HOME/.cache/localmodel}/controlplane"
out="$cache_root/$key"
bin="$out/bin"

have_all() {
  local b
  for b in kube-apiserver etcd helm; do
    [ -x "$bin/$b" ] || return 1
  done
}

if have_all; then
  log "reusing $bin"
  echo "$bin"
  exit 0
fi

mkdir -p "$cache_root"
exec 9>"$cache_root/.lock"
log "waiting for build lock $cache_root/.lock"
flock 9
if have_all; then # someone else built it while we waited
  log "reusing $bin"
  echo "$bin"
  exit 0
fi

export GOFLAGS="-trimpath -buildvcs=false -mod=readonly"
export CGO_ENABLED=0
export GOTOOLCHAIN=local

tmp="$(mktemp -d "$cache_root/.build.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
chmod 755 "$tmp"
mkdir -p "$tmp/bin"

modver() { (cd "$here/$1" && go list -m -f '{{.Version}}' "$2"); }
modtime() { (cd "$here/$1" && go list -m -f '{{with .Time}}{{.UTC.Format "2006-01-02T15:04:05Z"}}{{end}}' "$2"); }

start=$SECONDS

# kube-apiserver: same version ldflags as upstream hack/lib/version.sh.
kube_version="$(modver kube-apiserver k8s.io/kubernetes)"
kube_major="${kube_version#v}"; kube_major="${kube_major%%.*}"
kube_minor="${kube_version#v*.}"; kube_minor="${kube_minor%%.*}"
kube_date="$(modtime kube-apiserver k8s.io/kubernetes)"
kube_ldflags="-s -w"
for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
  kube_ldflags+=" -X '$pkg.gitVersion=$kube_version'"
  kube_ldflags+=" -X '$pkg.gitMajor=$kube_major'"
  kube_ldflags+=" -X '$pkg.gitMinor=$kube_minor'"
  kube_ldflags+=" -X '$pkg.gitCommit='"
  kube_ldflags+=" -X '$pkg.gitTreeState=clean'"
  kube_ldflags+=" -X '$pkg.buildDate=$kube_date'"
done
log "building kube-apiserver $kube_version"
(cd "$here/kube-apiserver" && go build -ldflags "$kube_ldflags" -o "$tmp/bin/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver) >&2

etcd_version="$(modver etcd go.etcd.io/etcd/server/v3)"
log "building etcd $etcd_version"
(cd "$here/etcd" && go build -ldflags "-s -w" -o "$tmp/bin/etcd" .) >&2

helm_version="$(modver helm helm.sh/helm/v4)"
log "building helm $helm_version"
(cd "$here/helm" && go build \
  -ldflags "-s -w -X helm.sh/helm/v4/internal/version.version=$helm_version -X helm.sh/helm/v4/internal/version.metadata= -X helm.sh/helm/v4/internal/version.gitTreeState=clean" \
  -o "$tmp/bin/helm" helm.sh/helm/v4/cmd/helm) >&2

cat >"$tmp/VERSIONS" <<EOF
kube-apiserver $kube_version
etcd $etcd_version
helm $helm_version
go $(go env GOVERSION)
recipe $RECIPE
EOF

rm -rf "$out"
mv "$tmp" "$out"
trap - EXIT
log "built in $((SECONDS - start))s: $bin"
echo "$bin"
