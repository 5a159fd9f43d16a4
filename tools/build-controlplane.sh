#!/usr/bin/env bash
# Builds the real control-plane binaries from Go modules into a cache outside
# the repository, keyed by their versions, so a second run costs nothing.
#
#   tools/build-controlplane.sh        # prints the bin directory on stdout
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
mod="$here/controlplane"
# shellcheck source=tools/versions.env
source "$here/versions.env"

key="k8s-${K8S_VERSION}_etcd-${ETCD_VERSION}_kwok-${KWOK_VERSION}_helm-${HELM_VERSION}"
bin="${TROUPE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/troupe}/$key/bin"

need=(kube-apiserver kube-controller-manager kube-scheduler etcd kwok helm kwok-stages.yaml)
missing=()
for b in "${need[@]}"; do [ -e "$bin/$b" ] || missing+=("$b"); done
if [ ${#missing[@]} -eq 0 ]; then echo "$bin"; exit 0; fi

mkdir -p "$bin"
start=$(date +%s)
export CGO_ENABLED=0 GOFLAGS=-buildvcs=false GOTOOLCHAIN=local

minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done

build() { # name package
  [ -x "$bin/$1" ] && return 0
  echo ">> building $1" >&2
  (cd "$mod" && go build -trimpath -ldflags "$ldflags" -o "$bin/$1.tmp" "$2") && mv "$bin/$1.tmp" "$bin/$1"
}
build kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver
build kube-controller-manager k8s.io/kubernetes/cmd/kube-controller-manager
build kube-scheduler k8s.io/kubernetes/cmd/kube-scheduler
build etcd go.etcd.io/etcd/server/v3
build kwok sigs.k8s.io/kwok/cmd/kwok
if [ ! -e "$bin/kwok-stages.yaml" ]; then
  # kwok's stock stages (node-initialize, heartbeat-with-lease, pod-ready,
  # pod-complete, pod-delete) ship in its module; kwok itself needs them named.
  kwok_dir=$(cd "$mod" && go list -m -f '{{.Dir}}' sigs.k8s.io/kwok)
  for f in "$kwok_dir"/kustomize/stage/{node/fast,node/heartbeat-with-lease,pod/fast}/*.yaml; do
    [ "$(basename "$f")" = kustomization.yaml ] && continue
    printf -- '---\n'; cat "$f"
  done > "$bin/kwok-stages.yaml.tmp"
  mv "$bin/kwok-stages.yaml.tmp" "$bin/kwok-stages.yaml"
fi
if [ ! -x "$bin/helm" ]; then
  # helm needs newer client libraries than the 1.36 control plane pins, so it
  # is built from its own module rather than from ours.
  echo ">> building helm" >&2
  GOBIN="$bin" go install -trimpath \
    -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" \
    "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
fi
echo ">> control plane built in $(( $(date +%s) - start ))s into $bin" >&2
echo "$bin"
