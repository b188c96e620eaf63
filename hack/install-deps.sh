#!/usr/bin/env bash
# Installs everything the project needs on a fresh Debian 12 machine (as root):
# Debian packages, then a virtualenv in .venv with the project and its dev tools.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

APT_PACKAGES=(
  libvirt-daemon-system qemu-system-x86 qemu-utils   # the hypervisor stack
  ovmf                                                # UEFI firmware for boot.firmware: uefi
  libvirt-dev pkg-config gcc                          # to build libvirt-python
  cpio busybox-static xz-utils                        # to pack the test guest
  genisoimage                                         # ISO images for CD-ROM tests
  iproute2 openssl procps util-linux
)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  log "apt: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  log "apt: all packages present"
fi

command -v go >/dev/null || die "Go is required to build the control plane (https://go.dev/doc/install)"

PY=${PYTHON:-python3}
if [[ ! -x $REPO_DIR/.venv/bin/python ]]; then
  log "python: creating .venv"
  "$PY" -m venv "$REPO_DIR/.venv"
fi
log "python: installing the project and dev tools into .venv"
"$REPO_DIR/.venv/bin/pip" install -q --disable-pip-version-check -e "$REPO_DIR[dev]"
