"""dvla_bus: the message-bus actor framework under dvla (it knows nothing of RL).

The public surface is what ``__all__`` lists; modules are importable on their own too
(``dvla_bus.wire`` depends on nothing of ours but ``dvla_bus.errors``)."""

from dvla_bus.control import (
    ControlClient,
    ControlHub,
    HubConfig,
    JoinInfo,
    open_control_client,
    open_control_hub,
)
from dvla_bus.errors import (
    ConfigError,
    DeadlineExceeded,
    DvlaError,
    PoolError,
    ProtocolError,
    ResourceError,
    TopologyError,
    WireError,
)
from dvla_bus.node import Node, NodeConfig, run_node
from dvla_bus.pool import Layout, SlabPool, attach_pool, create_pool
from dvla_bus.reaper import reap
from dvla_bus.replication import Replicator, open_replicator
from dvla_bus.supervisor import ChildStatus, Supervisor
from dvla_bus.topology import Topology, load_topology
from dvla_bus.transport import Delivery, Inbox, Outbox, open_inbox, open_outbox
from dvla_bus.weights import Manifest, WeightPool, WeightReader, attach_weights, create_weight_pool

__version__ = "0.1.0"

__all__ = [
    "ChildStatus",
    "ConfigError",
    "ControlClient",
    "ControlHub",
    "DeadlineExceeded",
    "Delivery",
    "DvlaError",
    "HubConfig",
    "Inbox",
    "JoinInfo",
    "Layout",
    "Manifest",
    "Node",
    "NodeConfig",
    "Outbox",
    "PoolError",
    "ProtocolError",
    "Replicator",
    "ResourceError",
    "SlabPool",
    "Supervisor",
    "Topology",
    "TopologyError",
    "WeightPool",
    "WeightReader",
    "WireError",
    "attach_pool",
    "attach_weights",
    "create_pool",
    "create_weight_pool",
    "load_topology",
    "open_control_client",
    "open_control_hub",
    "open_inbox",
    "open_outbox",
    "open_replicator",
    "reap",
    "run_node",
]
