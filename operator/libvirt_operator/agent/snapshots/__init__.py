"""The snapshot engine of the node agent (issue #8): plan (pure decisions), create, revert, delete and
clone, acting on libvirt through a JobContext (agent/jobs.py) and reporting only through it.

Entry points (all idempotent and re-entrant from the step recorded in status):
- create.run(ctx) -> None
- revert.run(ctx, request_id) -> None
- delete.run(ctx) -> bool
- clone.leaves(clone_spec, snapshot_obj, roots) -> dict[str, Chain]
"""
