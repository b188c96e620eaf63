import pytest

from libvirt_operator.storage import Chain, Layer, chain_from_qemu_img, chains_from_domain_xml

QEMU_IMG_INFO = [  # qemu-img info --backing-chain --output=json leaf.qcow2 (run in /img), trimmed
    {"filename": "leaf.qcow2", "format": "qcow2", "backing-filename": "mid.qcow2",
     "full-backing-filename": "mid.qcow2", "backing-filename-format": "qcow2"},
    {"filename": "mid.qcow2", "format": "qcow2", "backing-filename": "/base/base.raw",
     "full-backing-filename": "/base/base.raw", "backing-filename-format": "raw"},
    {"filename": "/base/base.raw", "format": "raw"},
]

LIVE_DISKS = """<domain><devices>
  <disk type='file' device='disk'>
    <driver name='qemu' type='qcow2'/>
    <source file='/img/leaf.qcow2' index='3'/>
    <backingStore type='file' index='2'>
      <format type='qcow2'/>
      <source file='/img/mid.qcow2'/>
      <backingStore type='file' index='1'>
        <format type='raw'/>
        <source file='/base/base.raw'/>
        <backingStore/>
      </backingStore>
    </backingStore>
    <target dev='vda' bus='virtio'/>
  </disk>
  <disk type='file' device='disk'>
    <driver name='qemu' type='raw'/>
    <source file='/img/data.raw' index='1'/>
    <backingStore/>
    <target dev='vdb' bus='virtio'/>
  </disk>
  <disk type='file' device='cdrom'><driver name='qemu' type='raw'/><target dev='sda' bus='sata'/></disk>
  <disk type='block' device='disk'><source dev='/dev/sdz'/><target dev='vdc' bus='virtio'/></disk>
</devices></domain>"""

EXPECTED = Chain.of(("/img/leaf.qcow2", "qcow2"), ("/img/mid.qcow2", "qcow2"), ("/base/base.raw", "raw"))


def test_qemu_img_chain_resolves_relative_backing_names_against_the_naming_file():
    assert chain_from_qemu_img("/img/leaf.qcow2", QEMU_IMG_INFO) == EXPECTED


def test_qemu_img_single_file():
    assert chain_from_qemu_img("/img/x.raw", [{"filename": "x.raw", "format": "raw"}]) == Chain.of(
        ("/img/x.raw", "raw"))


def test_qemu_img_inconsistent_listing_is_refused():
    with pytest.raises(ValueError, match="more layers"):
        chain_from_qemu_img("/img/x.raw", [{"format": "raw"}, {"format": "raw"}])
    with pytest.raises(ValueError, match="did not list"):
        chain_from_qemu_img("/img/leaf.qcow2", QEMU_IMG_INFO[:1])


def test_domain_xml_chains_follow_backing_store_and_skip_non_files():
    chains = chains_from_domain_xml(LIVE_DISKS)
    assert chains == {"vda": EXPECTED, "vdb": Chain.of(("/img/data.raw", "raw"))}
    assert chains["vda"] == chain_from_qemu_img("/img/leaf.qcow2", QEMU_IMG_INFO)


def test_inactive_xml_gives_the_source_only():
    xml = "<domain><devices><disk type='file'><driver type='qcow2'/><source file='/a/b.qcow2'/>" \
          "<target dev='vda'/></disk></devices></domain>"
    assert chains_from_domain_xml(xml) == {"vda": Chain.of(("/a/b.qcow2", "qcow2"))}


def test_properties_and_lookups():
    assert EXPECTED.active == Layer("/img/leaf.qcow2", "qcow2")
    assert EXPECTED.backing == EXPECTED.layers[1:]
    assert EXPECTED.base.path == "/base/base.raw"
    assert "/img/../img/mid.qcow2" in EXPECTED and "/img/other" not in EXPECTED
    assert EXPECTED.backing_of("/img/mid.qcow2") == Layer("/base/base.raw", "raw")
    assert EXPECTED.backing_of("/base/base.raw") is None
    with pytest.raises(ValueError):
        EXPECTED.index("/nope")


def test_snapshot_puts_a_leaf_on_top_and_a_revert_leaf_sits_on_the_snapshot_file():
    after_snapshot = EXPECTED.with_leaf("/img/leaf2.qcow2")
    assert after_snapshot.paths == ("/img/leaf2.qcow2", *EXPECTED.paths)
    revert = after_snapshot.from_layer("/img/leaf.qcow2").with_leaf("/img/revert.qcow2")
    assert revert.paths == ("/img/revert.qcow2", *EXPECTED.paths)


def test_commit_active_and_lower_layers():
    assert EXPECTED.after_commit().paths == ("/img/mid.qcow2", "/base/base.raw")
    assert EXPECTED.after_commit(base="/base/base.raw").paths == ("/base/base.raw",)
    assert EXPECTED.after_commit(top="/img/mid.qcow2").paths == ("/img/leaf.qcow2", "/base/base.raw")
    with pytest.raises(ValueError, match="below top"):
        EXPECTED.after_commit(top="/base/base.raw")
    with pytest.raises(ValueError, match="below top"):
        EXPECTED.after_commit(top="/img/mid.qcow2", base="/img/leaf.qcow2")


def test_pull_merges_into_the_active_file():
    assert EXPECTED.after_pull().paths == ("/img/leaf.qcow2",)
    assert EXPECTED.after_pull(base="/base/base.raw").paths == ("/img/leaf.qcow2", "/base/base.raw")
    with pytest.raises(ValueError):
        EXPECTED.after_pull(base="/img/leaf.qcow2")


def test_list_round_trip_and_invariants():
    assert Chain.from_list(EXPECTED.to_list()) == EXPECTED
    with pytest.raises(ValueError, match="twice"):
        Chain.of(("/a", "qcow2"), ("/a", "raw"))
    with pytest.raises(ValueError, match="absolute"):
        Chain.of(("a.qcow2", "qcow2"))
    with pytest.raises(ValueError):
        Chain(())
