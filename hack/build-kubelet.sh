#!/usr/bin/env bash
# Builds kubelet and kube-scheduler from the same k8s.io/kubernetes module version as the
# control plane (hack/versions.env), for the kubelet world (hack/kubelet-up.sh). Static
# binaries (CGO_ENABLED=0) in a versioned cache dir; prints that dir on stdout.
# A warm cache skips the build.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

BIN_DIR="$CACHE_DIR/bin/kubelet-$KUBERNETES_VERSION"
mkdir -p "$BIN_DIR"
export CGO_ENABLED=0 GOFLAGS=-buildvcs=false
WANT=(kubelet kube-scheduler)

missing=0
for b in "${WANT[@]}"; do [[ -x $BIN_DIR/$b ]] || missing=1; done
if ((missing)); then
  command -v go >/dev/null || die "Go is required to build kubelet (https://go.dev/doc/install)"
  mod="$CACHE_DIR/gowork/kubelet-$KUBERNETES_VERSION"
  minor=$(cut -d. -f2 <<<"$KUBERNETES_VERSION"); v="v0.${KUBERNETES_VERSION#v1.}"
  mkdir -p "$mod"; cd "$mod"
  kdir=$(go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
  [[ -n $kdir ]] || die "cannot download k8s.io/kubernetes@$KUBERNETES_VERSION"
  # As in build-control-plane.sh: every staging module k/k replaces locally is pinned to v0.N.P.
  staging=$(sed -n 's#^\s*\(k8s.io/[a-z0-9-]*\) => ./staging/.*#\1#p' "$kdir/go.mod" | sort -u)
  {
    echo "module localkubelet"; echo; echo "go 1.24"; echo
    echo "replace ("
    for m in $staging; do echo "	$m => $m $v"; done
    echo ")"
  } > go.mod
  pkgs=()
  for b in "${WANT[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$b@$KUBERNETES_VERSION"); done
  log "kubelet $KUBERNETES_VERSION: go get"
  go get "${pkgs[@]}" 2>"$mod/go-get.log" || { cat "$mod/go-get.log" >&2; die "go get failed"; }
  ld=""
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ld+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  for b in "${WANT[@]}"; do
    [[ -x $BIN_DIR/$b ]] && continue
    log "kubelet $KUBERNETES_VERSION: go build $b (minutes on 2 cores)"
    go build -trimpath -ldflags "-s -w $ld" -o "$BIN_DIR/$b.tmp" "k8s.io/kubernetes/cmd/$b"
    mv "$BIN_DIR/$b.tmp" "$BIN_DIR/$b"
  done
else
  log "kubelet $KUBERNETES_VERSION: cached"
fi
echo "$BIN_DIR"
