"""``<cputune>``: vCPU and emulator pinning."""

from __future__ import annotations

from libvirt_operator.domain.xmlbase import Attr, Children, IntAttr, XMLElement


class VcpuPin(XMLElement):
    TAG = "vcpupin"
    vcpu = IntAttr("vcpu")
    cpuset = Attr("cpuset")


class CPUTune(XMLElement):
    TAG = "cputune"
    CHILD_ORDER = ("shares", "period", "quota", "global_period", "global_quota", "emulator_period",
                   "emulator_quota", "iothread_period", "iothread_quota", "vcpupin", "emulatorpin",
                   "iothreadpin", "vcpusched", "iothreadsched", "cachetune", "memorytune")

    vcpupins = Children(VcpuPin)
    emulator_cpuset = Attr("cpuset", path="emulatorpin")

    def pins(self) -> dict[int, str]:
        return {p.vcpu: p.cpuset for p in self.vcpupins}
