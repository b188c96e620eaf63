"""``<features>``: hypervisor features; ACPI is what ACPI shutdown and reboot need."""

from __future__ import annotations

from libvirt_operator.domain.xmlbase import Flag, XMLElement


class Features(XMLElement):
    TAG = "features"
    CHILD_ORDER = ("acpi", "apic", "pae", "hap", "viridian", "privnet", "hyperv", "kvm", "pvspinlock",
                   "pmu", "vmport", "gic", "smm", "ioapic")

    acpi = Flag("acpi")
    apic = Flag("apic")
    pae = Flag("pae")
