"""``<os>``: guest type and machine, firmware or direct kernel boot, boot order."""

from __future__ import annotations

from libvirt_operator.domain.xmlbase import Attr, BoolAttr, Children, Text, XMLElement


class BootDevice(XMLElement):
    TAG = "boot"
    dev = Attr("dev")  # 'hd', 'cdrom', 'network', 'fd'


class GuestOS(XMLElement):
    TAG = "os"
    CHILD_ORDER = ("type", "firmware", "loader", "nvram", "kernel", "initrd", "cmdline", "dtb", "boot",
                   "bootmenu", "smbios", "bios")

    firmware = Attr("firmware")  # 'efi' asks libvirt to pick a UEFI build (at start, on 9.0)
    type = Text("type")  # 'hvm'
    arch = Attr("arch", path="type")
    machine = Attr("machine", path="type")  # libvirt stores the expanded name: 'q35' -> 'pc-q35-7.2'
    loader = Text("loader")
    loader_type = Attr("type", path="loader")  # 'rom' / 'pflash'
    loader_readonly = BoolAttr("readonly", path="loader")
    nvram = Text("nvram")
    kernel = Text("kernel")
    initrd = Text("initrd")
    cmdline = Text("cmdline")
    boot_entries = Children(BootDevice)

    @property
    def boot_devices(self) -> list[str]:
        """Firmware boot order, e.g. ['cdrom', 'hd']."""
        return [entry.dev for entry in self.boot_entries]

    @boot_devices.setter
    def boot_devices(self, devices: list[str]) -> None:
        self.boot_entries = [BootDevice(dev=dev) for dev in devices]

    @property
    def direct_kernel_boot(self) -> bool:
        return self.kernel is not None
