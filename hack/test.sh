#!/usr/bin/env bash
# The project's test command: installs what is missing, builds the cached world parts,
# then lint, import layering, and the full pytest suite against the real world.
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
exec pytest "$@"
