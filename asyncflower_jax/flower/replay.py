"""`ReplayGrid`: an in-process Flower Grid that replays the simulator's schedule through the deployment path.

Its nodes are the simulator's clients: node `node_base + c` holds partition c (node config
`partition-id=c num-partitions=N`) and runs a ClientApp in this process with its own `Context`
(whose state persists between messages, as on a SuperNode). The simulator's `Scheduler` decides
what the deployment leaves to the world:

- which idle client a dispatch goes to: pass `grid.choose` as the loop's `choose`; it dispatches
  through the scheduler, which also draws the task's duration;
- when replies arrive: `pull_messages` hands out one reply per call, of the in-flight task that
  finishes first (finish time, dispatch id), the order in which the simulator's arrivals pop.

Everything else is the deployment's own code: the ServerApp loop's versions, buffering, refill,
staleness and records, the ClientApp's data and training, the messages in between. With the same
config the federation's model therefore equals the simulator's (tests/flower/test_replay_parity.py),
which checks the deployment path without a network. Schedules with injected faults are not replayed
(a federation meets real faults, not drawn ones).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from flwr.app import Context, Error, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode

from ..engine.scheduler import Scheduler, Task
from .in_process_grid import InProcessGrid
from .protocol import CONFIG, DISPATCH_ID_KEY, NUM_PARTITIONS_KEY, PARTITION_ID_KEY, START_VERSION_KEY


class ReplayGrid(InProcessGrid):
    """See the module docstring. `arrivals` lists the scheduler's tasks in the order their replies were handed out."""

    def __init__(self, client_app, run_config: Mapping, scheduler: Scheduler, node_base: int = 1000, run_id: int = 1):
        if scheduler.faults is not None:
            raise ValueError("ReplayGrid replays schedules without injected faults (set faults.* to 0 and faults.timeout to null)")
        self.client_app = client_app
        self.scheduler = scheduler
        self.node_base = int(node_base)
        n = scheduler.num_clients
        self.contexts = {
            self.node_base + c: Context(run_id, self.node_base + c, {PARTITION_ID_KEY: c, NUM_PARTITIONS_KEY: n}, RecordDict(), dict(run_config))
            for c in range(n)
        }
        super().__init__(run_id)
        self._chosen: dict[int, Task] = {}  # client -> task dispatched by `choose`, awaiting its message
        self._out: dict[int, Message] = {}  # dispatch id -> train message
        self._ready: list[Message] = []  # replies handed out at the next pull (identification)
        self.arrivals: list[Task] = []

    # ---- the loop's node choice -----------------------------------------------------------------
    def choose(self, idle: Sequence[int], version: int) -> int:
        task = self.scheduler.dispatch(version)
        if task.client not in idle:
            raise RuntimeError(f"the scheduler dispatched client {task.client}, which the server loop does not have idle ({list(idle)})")
        self._chosen[task.client] = task
        return task.client

    # ---- Grid -------------------------------------------------------------------------------------
    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id  # as Flower's own grids do
            node = msg.metadata.dst_node_id
            if node not in self.contexts:
                raise RuntimeError(f"no node {node} in this grid")
            if msg.metadata.message_type == MessageType.TRAIN:
                task = self._chosen.pop(node - self.node_base, None)
                if task is None:
                    raise RuntimeError(f"a train message for node {node} whose client was not chosen through ReplayGrid.choose")
                config = msg.content.config_records[CONFIG]
                sent = (int(config[DISPATCH_ID_KEY]), int(config[START_VERSION_KEY]))
                if sent != (task.dispatch_id, task.start_version):
                    raise RuntimeError(f"the message for node {node} is dispatch {sent[0]} from version {sent[1]}; the scheduler's is {task.dispatch_id} from {task.start_version}")
                self._out[task.dispatch_id] = msg
            else:
                self._ready.append(self._answer(msg))
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        wanted = set(message_ids)
        if self._ready:
            replies = [r for r in self._ready if r.metadata.reply_to_message_id in wanted]
            self._ready = [r for r in self._ready if r.metadata.reply_to_message_id not in wanted]
            return replies
        if self.scheduler.num_in_flight == 0:
            return []
        task = self.scheduler.pop()
        msg = self._out.pop(task.dispatch_id)
        if msg.metadata.message_id not in wanted:
            raise RuntimeError(f"the server loop does not pull the reply of dispatch {task.dispatch_id}")
        self.arrivals.append(task)
        return [self._answer(msg)]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        ids = list(self.push_messages(messages))
        replies: list[Message] = []
        while len(replies) < len(ids):
            got = list(self.pull_messages(ids))
            if not got:
                break
            replies += got
        return replies

    def _answer(self, msg: Message) -> Message:
        """The ClientApp's reply, or an error reply when it raises (as a SuperNode sends)."""
        try:
            return self.client_app(message=msg, context=self.contexts[msg.metadata.dst_node_id])
        except Exception as exc:  # noqa: BLE001 - a client's exception is its reply
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
