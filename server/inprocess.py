"""A federation in this process: the real ServerApp logic and ClientApp, without Ray.

Why it exists: `fedrad compare` runs dozens of federations, and Flower's Simulation Engine
spends most of a short run starting Ray and its actors (measured on a 2-core machine: a
2-round run on two 20-image sites took 49 s, of which training was a few seconds). This
module swaps only the transport: `run_federation` (the ServerApp's body, with the FedRad
strategy) talks to a `Grid` that hands each message to the ClientApp (`client.app.app`)
of that node, one after another, each node keeping its own `Context` (and so its own BN)
across rounds exactly as a SuperNode does. Messages and replies pass through Flower's
protobuf serialisation, so each side gets a copy, as over the wire, and measured bytes are
the same. An exception in a ClientApp becomes an error reply, as in Flower.

Flower's Simulation Engine (`server.simulate`) stays the way to run the app as deployed;
`fedrad compare --engine flower` uses it, and a slow test checks both give the same report.
"""

from __future__ import annotations

import contextlib
import traceback
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from common.config import RunConfig
from common.sites import discover_sites

RUN_ID = 1
COORDINATOR_NODE_ID = 0  # Flower's SuperLink node id
FIRST_NODE_ID = 1001


def _copy(msg: Message) -> Message:
    """The message as the receiver would get it: serialised and parsed (a deep copy), id kept."""
    copy = message_from_proto(message_to_proto(msg))
    copy.metadata.__dict__["_message_id"] = msg.metadata.message_id
    return copy


class InProcessGrid(Grid):
    """A Grid whose nodes are ClientApp calls in this process, one Context per node."""

    def __init__(self, client_app: ClientApp, contexts: dict[int, Context]) -> None:
        self.client_app = client_app
        self.contexts = contexts
        self._run = Run.create_empty(RUN_ID)
        self._replies: dict[str, Message] = {}

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def _deliver(self, msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        if node not in self.contexts:
            return Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason=f"no node {node}"), reply_to=msg)
        try:
            reply = self.client_app(_copy(msg), self.contexts[node])
        except Exception as err:  # noqa: BLE001 - a site's failure is reported, as Flower does
            reason = f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=3)}"
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)
        reply.metadata.__dict__["_message_id"] = str(uuid.uuid4())
        return _copy(reply)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            self._replies[msg.metadata.message_id] = self._deliver(msg)
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


@contextlib.contextmanager
def coordinator_identity() -> Iterator[None]:
    """Flower stamps new Messages with the current task's ids: act as the coordinator's task, then restore."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, RUN_ID, COORDINATOR_NODE_ID
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def site_contexts(n_sites: int) -> dict[int, Context]:
    """One Context per virtual site, with the node config Flower's simulation gives (partition-id i)."""
    return {FIRST_NODE_ID + i: Context(run_id=RUN_ID, node_id=FIRST_NODE_ID + i,
                                       node_config={"partition-id": i, "num-partitions": n_sites},
                                       state=RecordDict(), run_config={})
            for i in range(n_sites)}


def run_inprocess(cfg: RunConfig) -> dict[str, Any]:
    """Run the federation on the site folders under `cfg.data_dir` in this process; return the report."""
    from client.app import app as client_app
    from server.app import run_federation

    sites = discover_sites(Path(cfg.data_dir))
    grid = InProcessGrid(client_app, site_contexts(len(sites)))
    with coordinator_identity():
        return run_federation(grid, cfg)
