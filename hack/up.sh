#!/usr/bin/env bash
# One command for a newcomer: install everything, start a local control plane, two
# libvirt nodes, the controller and one agent per node, and run the sample VM.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$REPO_DIR"
bash hack/install-deps.sh
exec .venv/bin/python -m localenv up "$@"
