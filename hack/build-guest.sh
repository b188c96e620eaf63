#!/usr/bin/env bash
# Builds the test guest (Debian cloud kernel + busybox/qemu-ga initramfs) for
# direct kernel boot, cached in $CACHE_DIR/guest/<hash of inputs>/.
# Progress goes to stderr; the image directory is printed on stdout.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

READY_MARKER=LVO-GUEST-READY
# memhp_default_state=online_movable: hot-added DIMMs come online by themselves, in
# ZONE_MOVABLE so that they can be unplugged again.
CMDLINE="console=ttyS0 quiet loglevel=0 memhp_default_state=online_movable"
# Drivers the guest loads (their dependencies are added automatically): virtio,
# SCSI disks on virtio-scsi, USB disks on qemu-xhci, SATA CD-ROMs with ISO 9660.
MODULES=(virtio_pci virtio_net virtio_blk virtio_console virtio_balloon virtio_scsi sd_mod
  xhci-pci usb-storage ahci sr_mod isofs evdev button)

GUEST_CACHE=$CACHE_DIR/guest
DEB_DIR=$GUEST_CACHE/debs
mkdir -p "$DEB_DIR"
exec 9>"$GUEST_CACHE/.lock"
flock 9   # one build at a time

# The kernel the amd64 metapackage currently points at. Not the cloud flavour: it
# has no USB and no AHCI (SATA) drivers at all.
KERNEL_PKG=$(apt-cache depends linux-image-amd64 2>/dev/null |
  awk '/Depends: linux-image-6\.1\.0-[0-9]+-amd64$/ {print $2; exit}')
[[ -n $KERNEL_PKG ]] || die "apt offers no linux-image-6.1.0-*-amd64 (run apt-get update?)"
PACKAGES=("$KERNEL_PKG" busybox-static qemu-guest-agent)
# Candidate versions, asked in one apt-cache call (each call costs ~0.5 s).
declare -A VERSION
while read -r pkg ver; do VERSION[$pkg]=$ver; done < <(
  apt-cache policy "${PACKAGES[@]}" | awk '/^[^ ]/ {sub(":$", "", $1); pkg = $1} /Candidate:/ {print pkg, $2}'
)

# Fetches PKG's candidate version into $DEB_DIR (once); prints the .deb path.
fetch_deb() {
  local pkg=$1 ver=${VERSION[$1]:-} deb out
  [[ -n $ver && $ver != "(none)" ]] || die "apt has no candidate for $pkg"
  deb=$DEB_DIR/${pkg}_${ver//:/%3a}_amd64.deb
  if [[ ! -s $deb ]]; then
    log "guest: downloading $pkg $ver"
    out=$(cd "$DEB_DIR" && apt-get download -q "$pkg=$ver" 2>&1) ||
      die "apt-get download $pkg=$ver failed: $out"
    [[ -s $deb ]] || die "expected $deb after download"
  fi
  echo "$deb"
}

WORK=$(mktemp -d "$GUEST_CACHE/.work.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

declare -A DEB
for pkg in "${PACKAGES[@]}"; do DEB[$pkg]=$(fetch_deb "$pkg"); done

# qemu-ga's shared libraries come from the host (ldd resolves them there).
dpkg-deb -x "${DEB[qemu-guest-agent]}" "$WORK/qga"
QGA=$WORK/qga/usr/sbin/qemu-ga
ldd_out=$(ldd "$QGA")
if grep -q "not found" <<<"$ldd_out"; then
  die "qemu-ga needs libraries missing on this host: $(grep 'not found' <<<"$ldd_out" | xargs)"
fi
mapfile -t LIBS < <(awk '/=> \// {print $3} /^\t\// {print $1}' <<<"$ldd_out")

# The cache key: this script, the guest files, the .debs and the host libraries.
KEY=$(
  {
    sha256sum <"${BASH_SOURCE[0]}"
    (cd "$HACK_DIR/guest" && find . -type f | LC_ALL=C sort | xargs sha256sum)
    for pkg in "${PACKAGES[@]}"; do basename "${DEB[$pkg]}"; done
    for lib in "${LIBS[@]}"; do echo "$lib $(sha256sum <"$lib")"; done
  } | sha256sum | cut -c1-16
)
IMAGE_DIR=$GUEST_CACHE/$KEY
if [[ -s $IMAGE_DIR/initrd.img && -s $IMAGE_DIR/vmlinux ]]; then
  log "guest: cached image $IMAGE_DIR"
  echo "$IMAGE_DIR"
  exit 0
fi

log "guest: building image $KEY (kernel $KERNEL_PKG)"
dpkg-deb -x "${DEB[$KERNEL_PKG]}" "$WORK/kernel"
KVER=$(basename "$(ls -d "$WORK"/kernel/lib/modules/*)")
MODDIR=$WORK/kernel/lib/modules/$KVER
dpkg-deb -x "${DEB[busybox-static]}" "$WORK/busybox"
BUSYBOX=$WORK/busybox/bin/busybox
"$BUSYBOX" depmod -b "$WORK/kernel" "$KVER"   # the .deb ships no modules.dep

ROOT=$WORK/root
mkdir -p "$ROOT"/{bin,sbin,usr/bin,usr/sbin,etc,dev,proc,sys,run,tmp,var,lib/modules}
ln -s ../run "$ROOT/var/run"

# Modules: each wanted one after its dependencies (modules.dep lists them
# deepest last), without duplicates.
declare -A LOADED
: >"$ROOT/etc/modules-load"
for mod in "${MODULES[@]}"; do
  line=$(grep -E "(^|/)$mod\.ko:" "$MODDIR/modules.dep") || die "module $mod not in $KVER"
  read -r -a chain <<<"${line/:/}"
  chain_order=()
  for ((i = ${#chain[@]} - 1; i >= 1; i--)); do chain_order+=("${chain[i]}"); done
  chain_order+=("${chain[0]}")
  for ko in "${chain_order[@]}"; do
    [[ -n ${LOADED[$ko]:-} ]] && continue
    LOADED[$ko]=1
    [[ $ko == *.ko ]] || die "unsupported module format: $ko"
    cp "$MODDIR/$ko" "$ROOT/lib/modules/$(basename "$ko")"
    basename "$ko" >>"$ROOT/etc/modules-load"
  done
done

# Userspace: busybox applets as links, qemu-ga with its libraries, our scripts.
cp "$BUSYBOX" "$ROOT/bin/busybox"
for applet in $("$ROOT/bin/busybox" --list); do
  [[ $applet == busybox ]] || ln -s busybox "$ROOT/bin/$applet"
done
cp "$QGA" "$ROOT/usr/sbin/qemu-ga"
for lib in "${LIBS[@]}"; do
  mkdir -p "$ROOT$(dirname "$lib")"
  cp -L "$lib" "$ROOT$lib"
done
install -m 0755 "$HACK_DIR/guest/init" "$ROOT/init"
install -m 0755 "$HACK_DIR/guest/shutdown" "$ROOT/sbin/shutdown"
install -m 0755 "$HACK_DIR/guest/hotplug" "$ROOT/sbin/hotplug"
echo "$READY_MARKER" >"$ROOT/etc/ready-marker"

log "guest: packing initramfs"
OUT=$WORK/out
mkdir -p "$OUT"
# Uncompressed, and the kernel as its bare ELF: under TCG, unpacking the XZ-compressed
# bzImage alone took ~10 s. QEMU boots the ELF vmlinux through its PVH entry point.
(cd "$ROOT" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) >"$OUT/initrd.img"
BZIMAGE=$WORK/kernel/boot/vmlinuz-$KVER
xz_at=$(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$BZIMAGE" | awk -F: 'NR == 1 {print $1}') || true
[[ -n $xz_at ]] || die "no XZ payload in $BZIMAGE"
tail -c +$((xz_at + 1)) "$BZIMAGE" >"$WORK/payload.xz"
xz -dcq --single-stream "$WORK/payload.xz" >"$OUT/vmlinux"   # ignores what follows the stream
[[ $(head -c4 "$OUT/vmlinux" | od -An -tx1 | tr -d ' ') == 7f454c46 ]] || die "$BZIMAGE: payload is not an ELF vmlinux"
echo "$CMDLINE" >"$OUT/cmdline"
echo "$READY_MARKER" >"$OUT/ready-marker"
echo "$KERNEL_PKG $KVER" >"$OUT/kernel-version"
chmod 0755 "$OUT"
chmod 0644 "$OUT"/*

rm -rf "$IMAGE_DIR"   # a leftover of an interrupted build
mv -T "$OUT" "$IMAGE_DIR"
log "guest: built $IMAGE_DIR ($(du -h "$IMAGE_DIR/initrd.img" | cut -f1) initramfs)"
echo "$IMAGE_DIR"
