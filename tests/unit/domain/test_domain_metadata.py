import json

from domain_samples import sample

from libvirt_operator.domain import DomainConfig, OperatorMetadata
from libvirt_operator.domain.metadata import NAMESPACE, config_hash


def test_hash_ignores_only_the_operator_metadata():
    dom = DomainConfig.from_xml(sample("extras"))
    base = config_hash(dom.element)
    dom.operator_metadata.generation = 8
    dom.operator_metadata.config_hash = "sha256:1111"
    assert config_hash(dom.element) == base
    dom.operator_metadata = None
    assert config_hash(dom.element) == base
    dom.devices.disks[0].target_dev = "hdb"
    assert config_hash(dom.element) != base


def test_hash_ignores_formatting():
    text = sample("kernel-boot")
    assert config_hash(DomainConfig.from_xml(text).element) == config_hash(
        DomainConfig.from_xml(text.replace("\n  ", "\n    ")).element)


def test_metadata_added_to_a_domain_without_metadata():
    text = sample("kernel-boot")
    dom = DomainConfig.from_xml(text)
    dom.operator_metadata = OperatorMetadata(vm_namespace="ns", vm_name="vm", vm_uid="u", generation=1,
                                             config_hash="sha256:ab")
    out = dom.to_xml()
    assert out.index("<uuid>") < out.index("<metadata>") < out.index("<memory ")  # libvirt's order
    back = DomainConfig.from_xml(out).operator_metadata
    assert (back.vm_namespace, back.vm_name, back.vm_uid, back.generation, back.config_hash) == (
        "ns", "vm", "u", 1, "sha256:ab")
    assert f'xmlns:lvo="{NAMESPACE}"' in out


def test_metadata_api_form_has_no_namespace():
    own = OperatorMetadata(vm_namespace="ns", vm_name="vm", generation=2)
    api = own.to_api_xml()
    assert api == "<vm><namespace>ns</namespace><name>vm</name><generation>2</generation></vm>"
    back = OperatorMetadata.from_api_xml("<vm>\n  <name>vm</name>\n  <generation>3</generation>\n</vm>")
    assert (back.vm_name, back.generation, back.vm_namespace) == ("vm", 3, None)
    assert own.element.tag == f"{{{NAMESPACE}}}vm"  # the original keeps its namespace


def test_disk_record_round_trips_in_libvirt_order():
    from libvirt_operator.storage.chain import Chain

    chains = {"root": Chain.of(("/img/root.s1.qcow2", "qcow2"), ("/img/root.qcow2", "qcow2")),
              "data": Chain.of(("/img/data.raw", "raw"))}
    own = OperatorMetadata(vm_namespace="ns", vm_name="vm", generation=2)
    own.disks = chains
    own.boot_fields = {"machine": "q35"}  # set after disks: written before them (CHILD_ORDER)
    api = own.to_api_xml()
    assert api.index("<bootFields>") < api.index("<disks>")
    assert OperatorMetadata.from_api_xml(api).disks == chains
    assert json.loads(own.disks_json)["root"] == [{"path": "/img/root.s1.qcow2", "format": "qcow2"},
                                                  {"path": "/img/root.qcow2", "format": "qcow2"}]
    dom = DomainConfig.from_xml(sample("kernel-boot"))
    dom.operator_metadata = own
    back = DomainConfig.from_xml(dom.to_xml()).operator_metadata
    assert back.disks == chains and back.disks["root"].active.path == "/img/root.s1.qcow2"
    own.disks = {}
    assert own.disks == {} and "<disks" not in own.to_api_xml()
