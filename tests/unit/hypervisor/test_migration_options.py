"""hypervisor.migration's pure parts: the flags and typed parameters of migrateToURI3, and jobStats parsing."""

import xml.etree.ElementTree as ET

import libvirt
import pytest

from libvirt_operator.hypervisor.migration import (
    BASE_FLAGS,
    JobStats,
    MigrationOptions,
    disk_destination_xml,
    migration_flags,
    migration_params,
)


def test_base_flags_only_by_default():
    options = MigrationOptions()
    assert migration_flags(options) == (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER
                                        | libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE)
    assert migration_params(options) == {}
    assert not migration_flags(options) & libvirt.VIR_MIGRATE_UNSAFE


def test_every_option_becomes_its_flag_or_parameter():
    options = MigrationOptions(data_uri="tcp://127.0.0.1", listen_address="127.0.0.1", bandwidth_mib=64,
                               auto_converge=True, auto_converge_initial=40, auto_converge_increment=20,
                               postcopy=True, copy_storage=True, migrate_disks=("vda", "vdb"),
                               dest_xml="<domain/>", persist_xml="<domain/>", unsafe=True,
                               parallel_connections=2, extra_flags=libvirt.VIR_MIGRATE_ABORT_ON_ERROR)
    flags = migration_flags(options)
    for flag in (libvirt.VIR_MIGRATE_AUTO_CONVERGE, libvirt.VIR_MIGRATE_POSTCOPY, libvirt.VIR_MIGRATE_NON_SHARED_INC,
                 libvirt.VIR_MIGRATE_UNSAFE, libvirt.VIR_MIGRATE_ABORT_ON_ERROR):
        assert flags & flag
    assert flags & BASE_FLAGS == BASE_FLAGS
    assert not flags & libvirt.VIR_MIGRATE_NON_SHARED_DISK  # incremental: the backing files are there already
    assert migration_params(options) == {
        libvirt.VIR_MIGRATE_PARAM_URI: "tcp://127.0.0.1",
        libvirt.VIR_MIGRATE_PARAM_LISTEN_ADDRESS: "127.0.0.1",
        libvirt.VIR_MIGRATE_PARAM_BANDWIDTH: 64,
        libvirt.VIR_MIGRATE_PARAM_AUTO_CONVERGE_INITIAL: 40,
        libvirt.VIR_MIGRATE_PARAM_AUTO_CONVERGE_INCREMENT: 20,
        libvirt.VIR_MIGRATE_PARAM_DEST_XML: "<domain/>",
        libvirt.VIR_MIGRATE_PARAM_PERSIST_XML: "<domain/>",
        libvirt.VIR_MIGRATE_PARAM_PARALLEL_CONNECTIONS: 2,
        libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS: ["vda", "vdb"],
    }


def test_auto_converge_tuning_is_sent_only_with_auto_converge():
    params = migration_params(MigrationOptions(auto_converge_initial=50, bandwidth_mib=0))
    assert params == {}  # 0 MiB/s means unlimited: no parameter


@pytest.mark.parametrize("kwargs", [
    {"copy_storage": True},  # an empty MIGRATE_DISKS would mean every writable disk
    {"migrate_disks": ("vda",)},
    {"dest_xml": "<domain/>"},  # 9.0 would persist the source's definition
    {"bandwidth_mib": -1},
])
def test_inconsistent_options_are_refused(kwargs):
    with pytest.raises(ValueError):
        MigrationOptions(**kwargs)


def test_job_stats_from_libvirt():
    stats = JobStats.from_libvirt({
        "type": libvirt.VIR_DOMAIN_JOB_UNBOUNDED, "operation": libvirt.VIR_DOMAIN_JOB_OPERATION_MIGRATION_OUT,
        "data_total": 1000, "data_processed": 250, "data_remaining": 750, "memory_dirty_rate": 10,
        "memory_page_size": 4096, "memory_iteration": 3, "downtime": 300, "time_elapsed": 1234,
        "auto_converge_throttle": 30,
    })
    assert stats.active and stats.type == "unbounded" and stats.operation == "migration-out"
    assert (stats.data_total, stats.data_processed, stats.data_remaining) == (1000, 250, 750)
    assert stats.percent == 25 and stats.dirty_rate_bytes == 40960 and stats.iteration == 3
    assert (stats.downtime, stats.elapsed, stats.auto_converge_throttle) == (300, 1234, 30)
    none = JobStats.from_libvirt({"type": libvirt.VIR_DOMAIN_JOB_NONE})
    assert not none.active and none.percent is None and none.dirty_rate_bytes is None and none.operation is None
    done = JobStats.from_libvirt({"type": libvirt.VIR_DOMAIN_JOB_COMPLETED, "data_total": 10, "data_processed": 3})
    assert done.percent == 100 and not done.active


def test_block_copy_destination_is_quoted():
    disk = ET.fromstring(disk_destination_xml("/var/lib/a'b&c.qcow2", "qcow2"))
    assert disk.get("type") == "file" and disk.find("source").get("file") == "/var/lib/a'b&c.qcow2"
    assert disk.find("driver").get("type") == "qcow2"
