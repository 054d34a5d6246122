"""The part of Flower's `Grid` interface that a grid living inside the server process needs no
network for: its run and message creation. Subclasses add the nodes and the message traffic."""

from __future__ import annotations

from flwr.app import Message
from flwr.serverapp import Grid
from flwr.supercore.run import Run


class InProcessGrid(Grid):
    """A Grid whose run is held in memory (`Run.create_empty(run_id)` until `set_run`)."""

    def __init__(self, run_id: int = 0):
        self._run = Run.create_empty(run_id)

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)
