#!/usr/bin/env bash
# Builds the Kubernetes lab's upstream binaries from their Go modules, once:
# they are cached outside the work tree, keyed by the versions, this script
# and the wrapper modules, so a warm run costs a second.
#
#   tests/k8s/build.sh            build if needed; print the cache directory
#
# The directory holds bin/ (etcd, kube-apiserver, kube-controller-manager,
# snapshot-controller, csi-snapshotter, csi-provisioner) and crd/ (the
# external-snapshotter's CRDs). Cache root: $STILLPOINT_LAB_CACHE, else
# ${XDG_CACHE_HOME:-~/.cache}/stillpoint/k8s-lab. Go module and build caches
# are Go's own (GOMODCACHE, GOCACHE). Progress goes to stderr.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"

command -v go >/dev/null || {
  echo "build.sh: the Kubernetes lab is built with Go (1.26 or newer); install it" >&2
  exit 1
}
export GOTOOLCHAIN=local GOFLAGS=-mod=mod CGO_ENABLED=0

key=$( (cat "$here/versions.env" "$here/build.sh" "$here/kubernetes/go.mod" "$here/etcd/go.mod"; go version) | sha256sum | cut -c1-16)
root="${STILLPOINT_LAB_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/stillpoint/k8s-lab}"
out="$root/$key"
if [ -f "$out/done" ]; then
  echo "$out"
  exit 0
fi
mkdir -p "$root"
exec 9>"$root/.lock"
flock 9 # one build at a time (parallel test binaries wait here)
if [ -f "$out/done" ]; then
  echo "$out"
  exit 0
fi

started=$(date +%s)
work="$out/src"
rm -rf "$out"
mkdir -p "$work" "$out/bin" "$out/crd"
cp -r "$here/kubernetes" "$here/etcd" "$work/"

say() { echo "build.sh: $*" >&2; }

# --- kube-apiserver, kube-controller-manager and the CSI sidecars --------
cd "$work/kubernetes"
k8s_mod=$(go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" | sed -n 's/^\t"GoMod": "\(.*\)",$/\1/p')
[ -f "$k8s_mod" ] || { say "could not download k8s.io/kubernetes@$KUBERNETES_VERSION"; exit 1; }
# Every `k8s.io/<name> => ./staging/...` of Kubernetes's own go.mod becomes
# `k8s.io/<name> => k8s.io/<name> $KUBERNETES_STAGING_VERSION` here.
staging=$(sed -n 's#^[[:space:]]*\(k8s\.io/[a-z0-9-]*\) => \./staging/.*#\1#p' "$k8s_mod")
[ -n "$staging" ] || { say "no staging replaces found in $k8s_mod"; exit 1; }
say "replacing $(echo "$staging" | wc -l) staging modules with $KUBERNETES_STAGING_VERSION"
for m in $staging; do
  go mod edit -replace="$m=$m@$KUBERNETES_STAGING_VERSION"
done
go mod edit -require="k8s.io/kubernetes@$KUBERNETES_VERSION"
tools=(
  "k8s.io/kubernetes/cmd/kube-apiserver"
  "k8s.io/kubernetes/cmd/kube-controller-manager"
  "github.com/kubernetes-csi/external-snapshotter/v8/cmd/snapshot-controller"
  "github.com/kubernetes-csi/external-snapshotter/v8/cmd/csi-snapshotter"
  "github.com/kubernetes-csi/external-provisioner/v6/cmd/csi-provisioner"
)
say "resolving modules"
go get \
  "k8s.io/kubernetes@$KUBERNETES_VERSION" \
  "github.com/kubernetes-csi/external-snapshotter/v8@$EXTERNAL_SNAPSHOTTER_VERSION" \
  "github.com/kubernetes-csi/external-snapshotter/client/v8@$EXTERNAL_SNAPSHOTTER_VERSION" \
  "github.com/kubernetes-csi/external-provisioner/v6@$EXTERNAL_PROVISIONER_VERSION" >&2
versions=("$KUBERNETES_VERSION" "$KUBERNETES_VERSION" "$EXTERNAL_SNAPSHOTTER_VERSION" "$EXTERNAL_SNAPSHOTTER_VERSION" "$EXTERNAL_PROVISIONER_VERSION")
for i in "${!tools[@]}"; do
  go get -tool "${tools[$i]}@${versions[$i]}" >&2
done
# Nothing may have moved past the pinned versions.
for pin in "k8s.io/kubernetes $KUBERNETES_VERSION" "k8s.io/api $KUBERNETES_STAGING_VERSION"; do
  set -- $pin
  got=$(go list -m -f '{{if .Replace}}{{.Replace.Version}}{{else}}{{.Version}}{{end}}' "$1")
  [ "$got" = "$2" ] || { say "$1 resolved to $got, not $2"; exit 1; }
done
minor=$(echo "$KUBERNETES_VERSION" | cut -d. -f2)
version_flags="-X k8s.io/component-base/version.gitVersion=$KUBERNETES_VERSION \
 -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor \
 -X k8s.io/client-go/pkg/version.gitVersion=$KUBERNETES_VERSION \
 -X k8s.io/client-go/pkg/version.gitMajor=1 -X k8s.io/client-go/pkg/version.gitMinor=$minor"
say "building ${tools[*]##*/} (a cold build takes a while)"
go build -trimpath -tags selinux,notest -ldflags "-s -w $version_flags" -o "$out/bin/" "${tools[@]}" >&2

client_dir=$(go list -m -f '{{.Dir}}' "github.com/kubernetes-csi/external-snapshotter/client/v8")
cp "$client_dir"/config/crd/*.yaml "$out/crd/"
chmod -R u+w "$out/crd"

# --- etcd -------------------------------------------------------------------
cd "$work/etcd"
go get -tool "go.etcd.io/etcd/server/v3@$ETCD_VERSION" >&2
say "building etcd"
go build -trimpath -ldflags "-s -w" -o "$out/bin/etcd" go.etcd.io/etcd/server/v3 >&2

took=$(( $(date +%s) - started ))
echo "$took" > "$out/build-seconds"
rm -rf "$work"
touch "$out/done"
say "built in ${took}s into $out"
echo "$out"
