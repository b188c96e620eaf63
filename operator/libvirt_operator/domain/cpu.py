"""``<cpu>``: CPU mode and model, and the guest NUMA topology."""

from __future__ import annotations

from libvirt_operator.domain.xmlbase import Attr, Children, IntAttr, KiBAttr, Text, XMLElement


class NumaCell(XMLElement):
    TAG = "cell"
    id = IntAttr("id")
    cpus = Attr("cpus")  # a cpuset: '0-3'
    memory_kib = KiBAttr("memory")


class CPU(XMLElement):
    TAG = "cpu"
    CHILD_ORDER = ("model", "vendor", "topology", "cache", "maxphysaddr", "feature", "numa")

    mode = Attr("mode")  # 'host-model', 'host-passthrough', 'custom', 'maximum'
    match = Attr("match")
    check = Attr("check")
    model = Text("model")
    model_fallback = Attr("fallback", path="model")
    sockets = IntAttr("sockets", path="topology")
    cores = IntAttr("cores", path="topology")
    threads = IntAttr("threads", path="topology")
    numa_cells = Children(NumaCell, path="numa")
