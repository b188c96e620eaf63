#!/usr/bin/env bash
# Builds kube-apiserver, kube-controller-manager, kubectl, etcd and helm from
# Go modules (no Docker, no prebuilt downloads) into a versioned cache dir.
# Prints the bin directory on stdout. A warm cache skips every build.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

BIN_DIR="$CACHE_DIR/bin/k8s-$KUBERNETES_VERSION-etcd-$ETCD_VERSION-helm-$HELM_VERSION"
mkdir -p "$BIN_DIR"
export CGO_ENABLED=0 GOFLAGS=-buildvcs=false
WORK="$CACHE_DIR/gowork"
mkdir -p "$WORK"

build_kubernetes() {
  local want=(kube-apiserver kube-controller-manager kubectl) missing=0 b
  for b in "${want[@]}"; do [[ -x $BIN_DIR/$b ]] || missing=1; done
  ((missing)) || { log "kubernetes $KUBERNETES_VERSION: cached"; return; }
  local mod="$WORK/kubernetes-$KUBERNETES_VERSION" minor staging v
  minor=$(cut -d. -f2 <<<"$KUBERNETES_VERSION"); v="v0.${KUBERNETES_VERSION#v1.}"
  mkdir -p "$mod"; cd "$mod"
  log "kubernetes $KUBERNETES_VERSION: resolving staging modules"
  local kdir
  kdir=$(go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
  [[ -n $kdir ]] || die "cannot download k8s.io/kubernetes@$KUBERNETES_VERSION"
  # Every staging module k/k replaces with ./staging/... is pinned to the matching v0.N.P.
  staging=$(sed -n 's#^\s*\(k8s.io/[a-z0-9-]*\) => ./staging/.*#\1#p' "$kdir/go.mod" | sort -u)
  {
    echo "module localcontrolplane"; echo; echo "go 1.24"; echo
    echo "replace ("
    for m in $staging; do echo "	$m => $m $v"; done
    echo ")"
  } > go.mod
  log "kubernetes $KUBERNETES_VERSION: go get ($(wc -w <<<"$staging") staging modules at $v)"
  local pkgs=()
  for b in "${want[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$b@$KUBERNETES_VERSION"); done
  go get "${pkgs[@]}" 2>"$mod/go-get.log" || { cat "$mod/go-get.log" >&2; die "go get failed"; }
  local ld="" pkg
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ld+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  for b in "${want[@]}"; do
    log "kubernetes $KUBERNETES_VERSION: go build $b (several minutes on 2 cores)"
    go build -trimpath -ldflags "-s -w $ld" -o "$BIN_DIR/$b.tmp" "k8s.io/kubernetes/cmd/$b"
    mv "$BIN_DIR/$b.tmp" "$BIN_DIR/$b"
  done
}

build_etcd() {
  [[ -x $BIN_DIR/etcd ]] && { log "etcd $ETCD_VERSION: cached"; return; }
  local mod="$WORK/etcd-$ETCD_VERSION"
  mkdir -p "$mod"; cd "$mod"
  printf 'module localetcd\n\ngo 1.23\n' > go.mod
  log "etcd $ETCD_VERSION: go get + build"
  go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" 2>"$mod/go-get.log" || { cat "$mod/go-get.log" >&2; die "go get failed"; }
  go build -trimpath -ldflags "-s -w" -o "$BIN_DIR/etcd.tmp" go.etcd.io/etcd/server/v3
  mv "$BIN_DIR/etcd.tmp" "$BIN_DIR/etcd"
}

build_helm() {
  [[ -x $BIN_DIR/helm ]] && { log "helm $HELM_VERSION: cached"; return; }
  log "helm $HELM_VERSION: go install"
  local ld="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
  GOBIN="$BIN_DIR" go install -trimpath -ldflags "$ld" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
}

build_etcd
build_helm
build_kubernetes
echo "$BIN_DIR"
