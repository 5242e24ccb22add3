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
from dvla_bus.data import DataBus, Publisher, Subscriber, open_data_bus
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
from dvla_bus.supervisor import ChildStatus, Supervisor
from dvla_bus.topology import Topology, load_topology

__version__ = "0.1.0"

__all__ = [
    "ChildStatus",
    "ConfigError",
    "ControlClient",
    "ControlHub",
    "DataBus",
    "DeadlineExceeded",
    "DvlaError",
    "HubConfig",
    "JoinInfo",
    "Node",
    "NodeConfig",
    "PoolError",
    "ProtocolError",
    "Publisher",
    "ResourceError",
    "Subscriber",
    "Supervisor",
    "Topology",
    "TopologyError",
    "WireError",
    "load_topology",
    "open_control_client",
    "open_control_hub",
    "open_data_bus",
    "run_node",
]
