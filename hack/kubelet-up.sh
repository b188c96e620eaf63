#!/usr/bin/env bash
# The kubelet world: the Helm chart's Pods on a real kubelet node (see hack/localenv/kubelet.py).
#   bash hack/kubelet-up.sh            # packages, kubelet + images (cached), control plane, containerd, kubelet
#   .venv/bin/python -m localenv kubelet-down [--purge]
# Needs what hack/install-deps.sh installs plus the packages below (installed here, not by the
# main suite's install).
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$REPO_DIR"
bash hack/install-deps.sh
bash hack/install-kubelet-deps.sh
bash hack/build-control-plane.sh >/dev/null
exec .venv/bin/python -m localenv kubelet-up "$@"
