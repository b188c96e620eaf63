"""The controller: cluster-level decisions (placement, later snapshots, migrations, QoS); never talks to libvirt."""
