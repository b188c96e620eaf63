from libvirt_operator.storage import Chain, References

BASE = ("/img/web.qcow2", "qcow2")
SNAP_LEAF = ("/img/web.s1.qcow2", "qcow2")
CLONE_LEAF = ("/img/web-clone.qcow2", "qcow2")


def world() -> References:
    # The VM web runs on a leaf over its original disk (snapshot s1 made the original a backing file);
    # the clone runs on its own leaf over the same original.
    return (References()
            .add_chain("vm/web", Chain.of(SNAP_LEAF, BASE))
            .add_files("snapshot/s1", ["/img/web.qcow2", "/img/web.s1.mem"])
            .add_chain("vm/web-clone", Chain.of(CLONE_LEAF, BASE)))


def test_every_layer_of_a_chain_is_referenced():
    refs = world()
    assert refs.owners("/img/web.qcow2") == {"vm/web", "snapshot/s1", "vm/web-clone"}
    assert refs.owners("/img/web.s1.qcow2") == {"vm/web"}
    assert refs.owners("/img/unknown") == frozenset()


def test_a_snapshot_delete_keeps_what_vms_and_clones_still_use():
    verdict = world().verdict(["/img/web.qcow2", "/img/web.s1.mem"], removing=["snapshot/s1"])
    assert verdict.delete == ("/img/web.s1.mem",)
    assert verdict.keep == {"/img/web.qcow2": ("vm/web", "vm/web-clone")}


def test_a_file_goes_only_when_every_owner_goes():
    refs = world()
    files = ["/img/web.qcow2", "/img/web.s1.qcow2"]
    assert refs.verdict(files, removing=["vm/web", "snapshot/s1"]).keep == {"/img/web.qcow2": ("vm/web-clone",)}
    assert refs.verdict(files, removing=["vm/web", "snapshot/s1", "vm/web-clone"]).delete == (
        "/img/web.qcow2", "/img/web.s1.qcow2")


def test_paths_are_normalized_and_duplicates_counted_once():
    verdict = world().verdict(["/img/./web.s1.mem", "/img/web.s1.mem"], removing=["snapshot/s1"])
    assert verdict.delete == ("/img/web.s1.mem",)


def test_orphans_are_existing_files_nobody_references():
    assert world().orphans(["/img/web.qcow2", "/img/leftover.qcow2", "/img/web.s1.mem"]) == (
        "/img/leftover.qcow2",)
