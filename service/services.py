"""Which services a node runs. Each service is an object with `state_machines()`,
`routes()`, `attach(runner)` and `async stop()`; the node wires them in."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.node import Node


def install_services(node: Node) -> None:
    # Services are added here as they land (locks, queues, cache).
    return None
