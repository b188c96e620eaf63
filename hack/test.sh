#!/usr/bin/env bash
# The project's test command: installs what is missing, builds the cached world parts,
# then lint, import layering, and the full pytest suite against the real world; without
# arguments, then the kubelet lane (tests/kubelet).
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$REPO_DIR"
bash hack/install-deps.sh
log "control plane binaries: $(bash hack/build-control-plane.sh)"
log "test guest image: $(bash hack/build-guest.sh)"
export PATH="$REPO_DIR/.venv/bin:$PATH"
log "ruff"
ruff check .
log "import layering"
lint-imports
log "pytest"
if (($#)); then
  exec pytest "$@"  # the caller's selection (tests/kubelet builds what it needs itself)
fi
pytest --ignore=tests/kubelet
# The kubelet lane (the chart's Pods on a real kubelet node), after the main suite: its own
# Debian packages, kubelet and the images (all cached), then its tests.
log "kubelet lane: packages"
bash hack/install-kubelet-deps.sh
log "kubelet lane: kubelet $(bash hack/build-kubelet.sh)"
log "kubelet lane: images $(bash hack/build-image.sh)"
exec pytest tests/kubelet
