#!/usr/bin/env bash
# Builds the tools the monitoring and chart tests run from their Go
# modules, once: prometheus and promtool (without service discovery
# plugins: the tests give Prometheus its targets in files) and helm. They
# are cached outside the work tree, keyed by the versions, this script and
# the wrapper module (tools.env, this script, tools/go.mod), so a warm run
# costs a second.
#
#   tests/k8s/tools.sh            build if needed; print the cache directory
#
# The directory holds bin/ (prometheus, promtool, helm) and crd/ (the
# Prometheus Operator's ServiceMonitor, PodMonitor and PrometheusRule CRDs,
# which the chart's monitoring objects are checked against).
#
# Cache root: $STILLPOINT_TOOLS_CACHE, else
# ${XDG_CACHE_HOME:-~/.cache}/stillpoint/tools. Go's module and build
# caches are its own (GOMODCACHE, GOCACHE). Progress goes to stderr.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=tools.env
source "$here/tools.env"

command -v go >/dev/null || {
  echo "tools.sh: the monitoring tools are built with Go (1.26 or newer); install it" >&2
  exit 1
}
export GOTOOLCHAIN=local GOFLAGS=-mod=mod CGO_ENABLED=0

key=$( (cat "$here/tools.env" "$here/tools.sh" "$here/tools/go.mod"; go version) | sha256sum | cut -c1-16)
root="${STILLPOINT_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/stillpoint/tools}"
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

say() { echo "tools.sh: $*" >&2; }
started=$(date +%s)
work="$out/src"
rm -rf "$out"
mkdir -p "$work" "$out/bin" "$out/crd"
cp "$here/tools/go.mod" "$work/"
cd "$work"
tools=(
  "github.com/prometheus/prometheus/cmd/prometheus@$PROMETHEUS_VERSION"
  "github.com/prometheus/prometheus/cmd/promtool@$PROMETHEUS_VERSION"
  "helm.sh/helm/v4/cmd/helm@$HELM_VERSION"
)
say "resolving modules"
go get "github.com/prometheus/prometheus@$PROMETHEUS_VERSION" "helm.sh/helm/v4@$HELM_VERSION" >&2
for t in "${tools[@]}"; do
  go get -tool "$t" >&2
done
for pin in "github.com/prometheus/prometheus $PROMETHEUS_VERSION" "helm.sh/helm/v4 $HELM_VERSION"; do
  set -- $pin
  got=$(go list -m -f '{{.Version}}' "$1")
  [ "$got" = "$2" ] || { say "$1 resolved to $got, not $2"; exit 1; }
done
version_flags="-X github.com/prometheus/common/version.Version=$PROMETHEUS_RELEASE \
 -X helm.sh/helm/v4/internal/version.version=$HELM_VERSION"
say "building prometheus, promtool and helm (a cold build takes a few minutes)"
go build -trimpath -tags remove_all_sd -ldflags "-s -w $version_flags" -o "$out/bin/" "${tools[@]%@*}" >&2

operator=$(go mod download -json "github.com/prometheus-operator/prometheus-operator@$PROMETHEUS_OPERATOR_VERSION" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')
[ -d "$operator" ] || { say "could not download prometheus-operator@$PROMETHEUS_OPERATOR_VERSION"; exit 1; }
for kind in servicemonitors podmonitors prometheusrules; do
  cp "$operator/example/prometheus-operator-crd/monitoring.coreos.com_$kind.yaml" "$out/crd/"
done
chmod -R u+w "$out/crd"

took=$(( $(date +%s) - started ))
echo "$took" > "$out/build-seconds"
rm -rf "$work"
touch "$out/done"
say "built in ${took}s into $out"
echo "$out"
