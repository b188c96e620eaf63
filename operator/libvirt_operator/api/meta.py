"""Names shared by every component: API group, kinds, labels, annotations, finalizers."""

GROUP = "virt.libvirt-operator.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# Placement: the controller records a VM's node in this label; each agent
# watches only objects carrying its own node name here (a server-side selector).
NODE_LABEL = f"{GROUP}/node"
# Nodes that run an agent carry this label (set by the chart / local world).
LIBVIRT_NODE_LABEL = f"{GROUP}/libvirt-node"

# Each component has its own prefix for finalizers, annotations and kopf state.
CONTROLLER_PREFIX = f"controller.{GROUP}"
AGENT_PREFIX = f"agent.{GROUP}"
AGENT_FINALIZER = f"{AGENT_PREFIX}/domain"

# Field managers for server-side apply of status.
CONTROLLER_MANAGER = "libvirt-operator-controller"
AGENT_MANAGER = "libvirt-operator-agent"
AGENT_JOBS_MANAGER = "libvirt-operator-agent-jobs"
MIGRATION_FINALIZER = f"{AGENT_PREFIX}/migration"


def agent_manager(node: str) -> str:
    """Each agent applies status under its own manager, so two agents (a migration's source and
    target) never erase each other's fields; the admission policy holds an agent to its own."""
    return f"{AGENT_MANAGER}@{node}"


def agent_migration_manager(node: str) -> str:
    """status.migration: the source writes Migrating/Landed, the target Succeeded (taking it over)."""
    return f"{AGENT_MANAGER}-migration@{node}"


def agent_jobs_manager(node: str) -> str:
    """The agent's long jobs (status.lastRevert, status.migration), beside its reconciler's fields."""
    return f"{AGENT_JOBS_MANAGER}@{node}"


# Agents renew a Lease named AGENT_LEASE_PREFIX + node name in the operator's namespace.
AGENT_LEASE_PREFIX = "lvo-agent-"
DEFAULT_NAMESPACE = "libvirt-operator-system"
