"""Regenerates tests/unit/domain/data/*.xml: domain XML as libvirt itself prints it.

Run as root from the repository root: ``.venv/bin/python tests/unit/domain/capture_samples.py``.
It starts one private libvirt node (hack/localenv), defines each hand-written
domain below with VIR_DOMAIN_DEFINE_VALIDATE and saves ``XMLDesc``; the test
guest is also started so that ``running.xml`` holds live-only details (domain
id, libvirt's aliases, the pty path, the agent channel's state) and
``running-inactive.xml`` the persistent definition next to it.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import libvirt

from localenv.guest import ensure_guest_image, wait_for_marker
from localenv.nodes import start_nodes, stop_nodes

DATA = Path(__file__).resolve().parent / "data"
WORLD = Path("/var/tmp/lvo-domain-samples")  # fixed, so paths in the samples stay stable
STORAGE = WORLD / "storage"

COMMON_DEVICES = """
    <serial type='pty'><log file='{storage}/{name}.console.log' append='on'/><target port='0'/></serial>
    <console type='pty'><target type='serial' port='0'/></console>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <memballoon model='virtio'/>"""

SAMPLES = {
    "kernel-boot": """<domain type='qemu'>
  <name>{name}</name>
  <uuid>0b8d5c1e-52a4-4c55-9d7e-1f0d2a3b4c01</uuid>
  <memory unit='MiB'>256</memory>
  <vcpu placement='static'>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{kernel}</kernel><initrd>{initrd}</initrd><cmdline>{cmdline}</cmdline>
  </os>
  <features><acpi/><apic/></features>
  <clock offset='utc'/>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='{storage}/root.qcow2'/><target dev='vda' bus='virtio'/><alias name='ua-disk-root'/></disk>
    <interface type='user'><mac address='52:54:00:00:00:01'/><model type='virtio'/>
      <alias name='ua-nic-eth0'/></interface>""" + COMMON_DEVICES + """
  </devices>
</domain>""",
    "firmware-disks": """<domain type='qemu'>
  <name>{name}</name>
  <uuid>0b8d5c1e-52a4-4c55-9d7e-1f0d2a3b4c02</uuid>
  <memory unit='GiB'>1</memory>
  <vcpu placement='static'>2</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type><boot dev='cdrom'/><boot dev='hd'/></os>
  <features><acpi/><apic/></features>
  <on_poweroff>destroy</on_poweroff><on_reboot>restart</on_reboot><on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='{storage}/root.qcow2'/><target dev='vda' bus='virtio'/><alias name='ua-disk-root'/></disk>
    <disk type='file' device='disk'><driver name='qemu' type='raw'/>
      <source file='{storage}/data.raw'/><target dev='sda' bus='scsi'/><alias name='ua-disk-data'/></disk>
    <disk type='file' device='disk'><driver name='qemu' type='raw'/>
      <source file='{storage}/stick.raw'/><target dev='sdb' bus='usb'/><readonly/><alias name='ua-disk-stick'/></disk>
    <disk type='file' device='cdrom'><driver name='qemu' type='raw'/>
      <source file='{storage}/install.iso'/><target dev='sdc' bus='sata'/><readonly/>
      <alias name='ua-disk-install'/></disk>
    <disk type='file' device='cdrom'><driver name='qemu' type='raw'/>
      <target dev='sdd' bus='sata'/><readonly/><alias name='ua-disk-empty'/></disk>
    <controller type='usb' index='0' model='qemu-xhci'><alias name='ua-usb'/></controller>
    <controller type='scsi' index='0' model='virtio-scsi'><alias name='ua-scsi'/></controller>""" + COMMON_DEVICES + """
  </devices>
</domain>""",
    "hotplug-kvm": """<domain type='kvm'>
  <name>{name}</name>
  <uuid>0b8d5c1e-52a4-4c55-9d7e-1f0d2a3b4c03</uuid>
  <maxMemory slots='16' unit='GiB'>4</maxMemory>
  <memory unit='KiB'>524288</memory>
  <currentMemory unit='KiB'>524288</currentMemory>
  <vcpu placement='static' current='2'>4</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type><boot dev='hd'/></os>
  <features><acpi/><apic/></features>
  <cpu mode='host-model'><numa><cell id='0' cpus='0-3' memory='524288' unit='KiB'/></numa></cpu>
  <clock offset='utc'/>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='{storage}/root.qcow2'/><target dev='vda' bus='virtio'/><alias name='ua-disk-root'/></disk>
    <controller type='pci' index='0' model='pcie-root'/>
    <controller type='pci' index='1' model='pcie-root-port'/>
    <controller type='pci' index='2' model='pcie-root-port'/>
    <controller type='pci' index='3' model='pcie-root-port'/>
    <controller type='pci' index='4' model='pcie-root-port'/>
    <controller type='pci' index='5' model='pcie-root-port'/>
    <controller type='pci' index='6' model='pcie-root-port'/>""" + COMMON_DEVICES + """
  </devices>
</domain>""",
    "uefi": """<domain type='kvm'>
  <name>{name}</name>
  <uuid>0b8d5c1e-52a4-4c55-9d7e-1f0d2a3b4c04</uuid>
  <memory unit='MiB'>512</memory>
  <vcpu>1</vcpu>
  <os firmware='efi'><type arch='x86_64' machine='q35'>hvm</type><boot dev='hd'/></os>
  <features><acpi/><apic/></features>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='{storage}/root.qcow2'/><target dev='vda' bus='virtio'/><alias name='ua-disk-root'/></disk>
  </devices>
</domain>""",
    "interfaces": """<domain type='qemu'>
  <name>{name}</name>
  <uuid>0b8d5c1e-52a4-4c55-9d7e-1f0d2a3b4c05</uuid>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <features><acpi/><apic/></features>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='{storage}/root.qcow2'/><target dev='vda' bus='virtio'/><alias name='ua-disk-root'/></disk>
    <interface type='network'><mac address='52:54:00:00:05:01'/><source network='default'/>
      <bandwidth><inbound average='1000' peak='5000' burst='1024' floor='200'/><outbound average='500'/></bandwidth>
      <model type='virtio'/><alias name='ua-nic-net'/></interface>
    <interface type='bridge'><mac address='52:54:00:00:05:02'/><source bridge='br0'/>
      <vlan><tag id='42'/></vlan><model type='e1000e'/><alias name='ua-nic-br'/></interface>
    <interface type='user'><mac address='52:54:00:00:05:03'/><model type='rtl8139'/>
      <alias name='ua-nic-user'/></interface>
    <interface type='network'><source network='default'/><model type='e1000'/><alias name='ua-nic-nomac'/></interface>
  </devices>
</domain>""",
    "extras": """<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <uuid>0b8d5c1e-52a4-4c55-9d7e-1f0d2a3b4c06</uuid>
  <title>A title</title>
  <description>Free text &amp; more</description>
  <metadata>
    <lvo:vm xmlns:lvo='https://virt.libvirt-operator.io/domain/v1alpha1'>
      <lvo:namespace>team-a</lvo:namespace><lvo:name>web</lvo:name>
      <lvo:uid>9d1f6a2e-1111-4c55-9d7e-1f0d2a3b4c06</lvo:uid><lvo:generation>7</lvo:generation>
      <lvo:configHash>sha256:0000</lvo:configHash>
    </lvo:vm>
    <other:note xmlns:other='https://example.org/other/v1'><other:text>kept</other:text></other:note>
  </metadata>
  <memory unit='MiB'>256</memory>
  <memtune><hard_limit unit='MiB'>512</hard_limit></memtune>
  <vcpu>1</vcpu>
  <cputune><shares>512</shares></cputune>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/><bootmenu enable='no'/></os>
  <features><acpi/><apic/><pae/></features>
  <clock offset='utc'><timer name='rtc' tickpolicy='catchup'/><timer name='hpet' present='no'/></clock>
  <pm><suspend-to-mem enabled='no'/><suspend-to-disk enabled='no'/></pm>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2' cache='none'/>
      <source file='{storage}/root.qcow2'/><target dev='hda' bus='ide'/><serial>SER-1</serial>
      <alias name='ua-disk-root'/></disk>
    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
  </devices>
  <qemu:commandline><qemu:arg value='-no-reboot'/></qemu:commandline>
</domain>""",
    "running": """<domain type='qemu'>
  <name>{name}</name>
  <uuid>0b8d5c1e-52a4-4c55-9d7e-1f0d2a3b4c07</uuid>
  <maxMemory slots='16' unit='KiB'>1048576</maxMemory>
  <memory unit='KiB'>262144</memory>
  <vcpu placement='static' current='1'>2</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{kernel}</kernel><initrd>{initrd}</initrd><cmdline>{cmdline}</cmdline>
  </os>
  <features><acpi/><apic/></features>
  <cpu><numa><cell id='0' cpus='0-1' memory='262144' unit='KiB'/></numa></cpu>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff><on_reboot>restart</on_reboot><on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='{storage}/root.qcow2'/><target dev='vda' bus='virtio'/><alias name='ua-disk-root'/></disk>
    <disk type='file' device='cdrom'><driver name='qemu' type='raw'/>
      <source file='{storage}/install.iso'/><target dev='sda' bus='sata'/><readonly/>
      <alias name='ua-disk-install'/></disk>
    <controller type='usb' index='0' model='qemu-xhci'><alias name='ua-usb'/></controller>
    <interface type='user'><mac address='52:54:00:00:07:01'/><model type='virtio'/>
      <alias name='ua-nic-eth0'/></interface>
    <serial type='pty'><log file='{storage}/{name}.console.log' append='on'/><target port='0'/>
      <alias name='ua-serial0'/></serial>
    <console type='pty'><target type='serial' port='0'/></console>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/>
      <alias name='ua-guest-agent'/></channel>
    <memballoon model='virtio'><alias name='ua-balloon'/></memballoon>
  </devices>
</domain>""",
}


def _prepare_storage() -> None:
    STORAGE.mkdir(parents=True, exist_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(STORAGE / "root.qcow2"), "1G"], check=True)
    for raw, size in (("data.raw", 1 << 20), ("stick.raw", 1 << 20), ("install.iso", 1 << 20)):
        with open(STORAGE / raw, "wb") as f:
            f.truncate(size)


def _wait_agent_connected(dom: libvirt.virDomain, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while "state='connected'" not in dom.XMLDesc(0):
        if time.monotonic() > deadline:
            raise TimeoutError("guest agent channel never connected")
        time.sleep(0.2)


def main() -> None:
    if WORLD.exists():
        stop_nodes(WORLD)
        shutil.rmtree(WORLD)
    image = ensure_guest_image()
    node = start_nodes(WORLD, ["samples"])[0]
    try:
        _prepare_storage()
        conn = node.connect()
        for sample, template in SAMPLES.items():
            name = f"lvo-sample-{sample}"
            xml = template.format(name=name, storage=STORAGE, kernel=image.kernel, initrd=image.initrd,
                                  cmdline=image.cmdline)
            dom = conn.defineXMLFlags(xml, libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
            if sample == "running":
                dom.create()
                wait_for_marker(STORAGE / f"{name}.console.log", image.ready_marker)
                _wait_agent_connected(dom)
                (DATA / "running.xml").write_text(dom.XMLDesc(0))
                (DATA / "running-inactive.xml").write_text(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
                dom.destroy()
            else:
                (DATA / f"{sample}.xml").write_text(dom.XMLDesc(0))
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
            print(f"captured {sample}")
        conn.close()
    finally:
        stop_nodes(WORLD)


if __name__ == "__main__":
    main()
