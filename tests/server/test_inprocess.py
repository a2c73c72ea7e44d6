"""The in-process grid: each node's Context persists, messages arrive as copies, a crash becomes an error reply."""

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from common.records import from_numpy, to_numpy
from server.inprocess import InProcessGrid, coordinator_identity, site_contexts

fake = ClientApp()


@fake.train()
def _train(msg, context):
    if context.node_config["partition-id"] == 2:
        raise RuntimeError("disk full at site 2")
    calls = int(context.state["seen"]["calls"]) + 1 if "seen" in context.state else 1
    context.state["seen"] = ConfigRecord({"calls": calls})
    arrays = to_numpy(msg.content["arrays"])
    arrays["w"] += 1.0  # a site changing what it received must not change the coordinator's copy
    return Message(RecordDict({"arrays": from_numpy(arrays),
                               "metrics": MetricRecord({"calls": calls})}), reply_to=msg)


def send_round(grid, arrays):
    return list(grid.send_and_receive([Message(RecordDict({"arrays": arrays}), node, "train")
                                       for node in grid.get_node_ids()]))


def test_state_persists_per_node_and_failures_become_error_replies():
    grid = InProcessGrid(fake, site_contexts(3))
    arrays = from_numpy({"w": np.zeros(3, np.float32)})
    with coordinator_identity():
        send_round(grid, arrays)
        replies = send_round(grid, arrays)
    ok = [r for r in replies if not r.has_error()]
    failed = [r for r in replies if r.has_error()]
    assert len(ok) == 2 and [r.content["metrics"]["calls"] for r in ok] == [2, 2]
    assert len(failed) == 1 and "disk full at site 2" in failed[0].error.reason
    np.testing.assert_array_equal(to_numpy(arrays)["w"], 0.0)  # the coordinator's arrays untouched
    np.testing.assert_array_equal(to_numpy(ok[0].content["arrays"])["w"], 1.0)
    assert {r.metadata.reply_to_message_id for r in replies} and all(r.metadata.message_id for r in replies)
    assert isinstance(ok[0].content["arrays"], ArrayRecord)
