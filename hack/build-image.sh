#!/usr/bin/env bash
# Builds the operator's images with podman from Debian packages only (no registry needed):
#   1. a Debian 12 base image made by mmdebstrap (cached in $CACHE_DIR/images/base-*.tar);
#   2. the Containerfile's targets controller, agent and full (embedded mode), tagged
#      localhost/libvirt-operator:<key>-controller, <key>-agent and <key>, where <key> is a hash
#      of every input (Containerfile, pyproject.toml, operator/, images/, the base image);
#   3. a pause image for containerd's Pod sandboxes (images/pause, static Go), tagged localhost/pause:lvo.
# Each image is also saved as a docker archive in $CACHE_DIR/images/<key>/ (for `ctr images import`).
# A warm cache (same key, archives present) skips every build.
# Prints "KEY ARCHIVE_DIR" on stdout.
#
# The build reaches the package registries as the host does: host network, and the host's
# CA bundle mounted for pip (at /run/host-ca.crt: over /etc/ssl/certs it would break the
# ca-certificates package's own postinst, which rewrites that file). runc needs the explicit ulimits here (it may not raise the
# hard limits of this machine: "error setting rlimit type 7: operation not permitted").
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$REPO_DIR"

for tool in podman mmdebstrap; do
  command -v "$tool" >/dev/null || die "$tool is missing: apt-get install podman mmdebstrap (hack/kubelet-up.sh does)"
done
IMAGES="$CACHE_DIR/images"
mkdir -p "$IMAGES"
PODMAN_RUN_OPTS=(--network host --ulimit nofile=1024:1024 --ulimit nproc=4096:4096)
SUITE=bookworm
REPO_NAME=localhost/libvirt-operator

# --- 1. base image: Debian minbase without docs, man pages or locales (dpkg excludes them from
# every later apt-get install in the images too)
base_tar="$IMAGES/base-$SUITE-minbase-v2.tar"  # bump the suffix when the recipe changes
base_ref="localhost/debian:12-minbase"
if [[ ! -s $base_tar ]]; then
  log "base: mmdebstrap --variant=minbase $SUITE (about 30 s)"
  sources=/etc/apt/sources.list.d/debian.sources
  [[ -r $sources ]] || sources=""  # mmdebstrap's default mirror then
  # The system's python3 for mmtarfilter (a pyenv shim on PATH makes every package extraction slow).
  # merged-usr hook: /usr merged by mmdebstrap itself, not by the usrmerge package (which drags in perl).
  PATH=/usr/sbin:/usr/bin:/sbin:/bin mmdebstrap --quiet --variant=minbase --format=tar \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/locale/locale.alias' \
    --aptopt='APT::Install-Recommends "false"' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin "$1"/var/log/*.log' \
    "$SUITE" "$base_tar.tmp" $sources
  mv "$base_tar.tmp" "$base_tar"
  podman rmi -f "$base_ref" >/dev/null 2>&1 || true
fi
base_sum=$(sha256sum "$base_tar" | cut -c1-16)
if [[ $(podman image inspect --format '{{index .Labels "lvo.base"}}' "$base_ref" 2>/dev/null) != "$base_sum" ]]; then
  log "base: podman import"
  podman import --change "LABEL lvo.base=$base_sum" --change 'CMD ["/bin/bash"]' "$base_tar" "$base_ref" >/dev/null
fi

# --- 2. the operator images, keyed by their inputs
key=$( {
  echo "base $base_sum"
  # The working-tree files themselves (uncommitted changes count too).
  find Containerfile Containerfile.dockerignore pyproject.toml operator images -type f \
       ! -name '*.pyc' ! -path '*/__pycache__/*' -print0 | sort -z | xargs -0 sha256sum
} | sha256sum | cut -c1-12)
out="$IMAGES/$key"
targets=(controller agent full)
tag_of() { [[ $1 == full ]] && echo "$REPO_NAME:$key" || echo "$REPO_NAME:$key-$1"; }

have_all=1
for t in "${targets[@]}" pause; do [[ -s $out/$t.tar ]] || have_all=0; done
if ((have_all)); then
  log "images $key: cached"
else
  mkdir -p "$out"
  for t in "${targets[@]}"; do
    [[ -s $out/$t.tar ]] && continue
    began=$SECONDS
    log "image $t: podman build --target $t"
    podman build --quiet "${PODMAN_RUN_OPTS[@]}" \
      --volume /etc/ssl/certs/ca-certificates.crt:/run/host-ca.crt:ro --build-arg PIP_CERT=/run/host-ca.crt \
      --build-arg "DEBIAN_IMAGE=$base_ref" --target "$t" --label "lvo.key=$key" \
      -f Containerfile -t "$(tag_of "$t")" . >/dev/null
    podman save --quiet --format docker-archive -o "$out/$t.tar.tmp" "$(tag_of "$t")"
    mv "$out/$t.tar.tmp" "$out/$t.tar"
    log "image $t: $(( SECONDS - began )) s, $(podman image inspect --format '{{.Size}}' "$(tag_of "$t")" \
      | awk '{printf "%.0f MB", $1/1e6}')"
  done
  if [[ ! -s $out/pause.tar ]]; then
    # The Pod sandbox image (containerd's sandbox_image): a static Go binary that waits for a
    # signal and reaps; registry.k8s.io/pause is out of reach here.
    pause_dir=$(mktemp -d)
    trap 'rm -rf "$pause_dir"' EXIT
    ( cd images/pause && CGO_ENABLED=0 GOFLAGS=-buildvcs=false go build -trimpath -ldflags "-s -w" -o "$pause_dir/pause" . )
    printf 'FROM scratch\nCOPY pause /pause\nUSER 65535:65535\nENTRYPOINT ["/pause"]\n' > "$pause_dir/Containerfile"
    podman build --quiet "${PODMAN_RUN_OPTS[@]}" -t localhost/pause:lvo "$pause_dir" >/dev/null
    podman save --quiet --format docker-archive -o "$out/pause.tar.tmp" localhost/pause:lvo
    mv "$out/pause.tar.tmp" "$out/pause.tar"
  fi
fi
# Every code change makes a new key: keep the two newest sets of archives and images, drop older ones.
for old in $(ls -1dt "$IMAGES"/*/ 2>/dev/null | tail -n +3); do
  old_key=$(basename "$old")
  [[ $old_key == "$key" ]] && continue
  rm -rf "$old"
  podman images --format '{{.Repository}}:{{.Tag}}' | grep -F ":$old_key" | xargs -r podman rmi -f >/dev/null 2>&1 || true
done
podman image prune -f >/dev/null 2>&1 || true  # the dangling layers of replaced builds
echo "$key $out"
