#!/usr/bin/env bash
# Debian packages of the kubelet lane only (the main suite does not need them): podman and
# mmdebstrap build the images, containerd + runc + the CNI plugins run the Pods.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
PACKAGES=(podman mmdebstrap containerd runc containernetworking-plugins)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  log "apt: installing ${missing[*]}"
  apt-get update -qq
  # No init system starts containerd here: the kubelet world runs its own, with its own config.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  log "apt (kubelet lane): all packages present"
fi
