# Shared helpers for hack/ scripts. Source it; do not run it.
set -euo pipefail
HACK_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$HACK_DIR")
# shellcheck source=versions.env
source "$HACK_DIR/versions.env"
# Build caches live outside the repo so a fresh clone on a warm machine reuses them.
CACHE_DIR=${LIBVIRT_OPERATOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/libvirt-operator}
mkdir -p "$CACHE_DIR"
log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
