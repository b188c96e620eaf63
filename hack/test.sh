#!/usr/bin/env bash
# The project's test command: installs what is missing, builds the cached world parts,
# then lint, import layering, and the full pytest suite against the real world.
#
# Without arguments the suite runs in three parts:
#   1. two shards side by side, each in its own world (its own control plane and libvirt nodes):
#      A = tests/unit + tests/e2e, B = tests/world + tests/addon, then the kubelet lane (tests/kubelet);
#   2. alone, the tests that measure rates and CPU shares (QoS, NIC shaping, migration convergence),
#      so that nothing else competes with what they measure.
# With arguments: `pytest "$@"`.
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
if (($#)); then
  log "pytest $*"
  exec pytest "$@"  # the caller's selection (tests/kubelet builds what it needs itself)
fi

MEASURING=(tests/e2e/test_qos.py tests/e2e/test_qos_network.py tests/world/test_tuning.py
           tests/world/test_netshape.py tests/world/test_migration_hv.py)
ignore=()
for f in "${MEASURING[@]}"; do ignore+=("--ignore=$f"); done

shard_a() {
  pytest -p no:cacheprovider --durations=25 "${ignore[@]}" tests/unit tests/e2e
}
shard_b() {
  local rc=0
  pytest -p no:cacheprovider --durations=25 "${ignore[@]}" tests/world tests/addon || rc=$?
  # The kubelet lane (the chart's Pods on a real kubelet node): its own Debian packages, kubelet
  # and the images (all cached), then its tests.
  log "kubelet lane: packages"
  bash hack/install-kubelet-deps.sh
  log "kubelet lane: kubelet $(bash hack/build-kubelet.sh)"
  log "kubelet lane: images $(bash hack/build-image.sh)"
  pytest -p no:cacheprovider tests/kubelet || rc=$?
  return "$rc"
}
prefixed() {  # run "$2..." with every output line prefixed by "[$1] "
  local tag=$1; shift
  "$@" 2>&1 | sed -u "s/^/[$tag] /"
  return "${PIPESTATUS[0]}"
}

log "pytest, two shards side by side: [A] unit + e2e, [B] world + addon + kubelet lane"
start=$SECONDS
prefixed A shard_a & a=$!
prefixed B shard_b & b=$!
rc_a=0; rc_b=0
wait "$a" || rc_a=$?
wait "$b" || rc_b=$?
log "shards done in $((SECONDS - start)) s: A exit $rc_a, B exit $rc_b"

log "pytest, alone: the tests that measure rates and shares"
rc_m=0
pytest -p no:cacheprovider --durations=15 "${MEASURING[@]}" || rc_m=$?
log "exit codes: A $rc_a, B $rc_b, measuring $rc_m; total $((SECONDS - start)) s"
((rc_a == 0 && rc_b == 0 && rc_m == 0))
