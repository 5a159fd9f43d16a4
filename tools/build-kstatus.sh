#!/usr/bin/env bash
# Builds the kstatus checker (tools/kstatus, on sigs.k8s.io/cli-utils) from Go
# modules into a cache outside the repository, keyed by its sources and this
# script, so a second run costs nothing.
#
#   tools/build-kstatus.sh        # prints the path of the binary on stdout
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
mod="$here/kstatus"
key=$(cat "$mod/go.mod" "$mod/go.sum" "$mod/main.go" "$here/build-kstatus.sh" | sha256sum | cut -c1-16)
bin="${TROUPE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/troupe}/kstatus-$key/bin/kstatus"

if [ -x "$bin" ]; then echo "$bin"; exit 0; fi

mkdir -p "$(dirname "$bin")"
start=$(date +%s)
echo ">> building kstatus" >&2
(cd "$mod" && CGO_ENABLED=0 GOFLAGS="-buildvcs=false -mod=readonly" GOTOOLCHAIN=local \
  go build -trimpath -ldflags "-s -w" -o "$bin.tmp" .)
mv "$bin.tmp" "$bin"
echo ">> kstatus built in $(( $(date +%s) - start ))s into $bin" >&2
echo "$bin"
