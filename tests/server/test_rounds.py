"""The round loop: true round numbers after a resume, lost sites recorded by name, a hook per round."""

import json
import time

import numpy as np
import pytest
from flwr.app import Array, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedrad.common.packing import LAYOUT, WIRE, is_packed, pack_content, unpack_content
from fedrad.common.piggyback import combine, evaluate_round
from fedrad.common.records import from_numpy, to_numpy
from fedrad.server.aggregate import spec_of
from fedrad.server.rounds import run_rounds
from fedrad.server.strategy import FedRad

pytestmark = pytest.mark.usefixtures("flower_task")
SHARED = {"w": np.zeros(3, np.float32)}


class Node:
    def __init__(self, node_id, name):
        self.node_id, self.name = node_id, name


class FakeGrid:
    """Nodes 1, 2, 3 (sites a, b, c); node 3 never answers a train message (lost mid-round).

    After each lost message node 3 is offline for `offline_s` seconds, as a crashed site is
    until its restarted daemon is let back in.
    """

    def __init__(self, offline_s=0.0, start_offline=False, refuses_training=()):
        self.rounds_seen, self.sent_to, self.evaluate_first = [], [], []
        self.refuses_training = refuses_training  # nodes that evaluate but refuse to train (small-count)
        self.offline_s, self.back_at = offline_s, time.monotonic() + offline_s if start_offline else 0.0

    def get_node_ids(self):
        return [1, 2] if time.monotonic() < self.back_at else [1, 2, 3]

    def get_nodes(self):
        return [Node(1, "a"), Node(2, "b"), Node(3, "c")]

    def send_and_receive(self, messages, *, timeout):
        replies = []
        for i, msg in enumerate(messages):
            msg.content = unpack_content(msg.content)  # as a site's ClientApp reads it (fedrad.client.app.on_the_wire)
            msg.metadata.__dict__["_message_id"] = f"m{msg.metadata.dst_node_id}-{i}"
            node = msg.metadata.dst_node_id
            self.rounds_seen.append((msg.metadata.message_type, int(msg.content["config"]["server-round"])))
            self.sent_to.append(self.rounds_seen[-1] + (node,))
            if msg.metadata.message_type == "train" and node == 3:
                self.back_at = time.monotonic() + self.offline_s
                continue
            content = RecordDict({"metrics": MetricRecord({"num-examples": 10, "auc": 0.5}),
                                  "site": ConfigRecord({"name": "abc"[node - 1]})})
            if msg.metadata.message_type == "train":
                first = evaluate_round(msg.content)
                self.evaluate_first.append((int(msg.content["config"]["server-round"]), first, node))
                evaluation = RecordDict(dict(content.items()))
                content = RecordDict({"site": content["site"]})
                arrays = {k: v + node for k, v in to_numpy(msg.content["arrays"]).items()}
                content["arrays"] = from_numpy(arrays)
                content["metrics"] = MetricRecord({"num-examples": 10, "train-loss": 0.1})
                if node in self.refuses_training:
                    content = None
                if first is not None:  # the evaluation rides in the reply, as a site sends it
                    content = combine(content, evaluation, None if content else ("small-count", "0123456789ab"))
                elif content is None:  # a plain train message refused: an error reply with the code
                    reply = Message(Error(104, "small-count incident=0123456789ab"), reply_to=msg)
                    reply.metadata.__dict__["_src_node_id"] = node
                    replies.append(reply)
                    continue
            reply = Message(content=content, reply_to=msg)
            reply.metadata.__dict__["_src_node_id"] = node
            replies.append(reply)
        return replies


def test_resumed_rounds_keep_their_numbers_and_lost_sites_are_named():
    grid, ends = FakeGrid(), []
    strategy = FedRad(expected=spec_of(SHARED), min_sites=2)
    final = run_rounds(grid, strategy, from_numpy(SHARED), first=3, last=4, timeout=5.0,
                       train_config=ConfigRecord({}), evaluate_config=ConfigRecord({}),
                       on_round_end=lambda r, arrays: ends.append((r, to_numpy(arrays)["w"].copy())))
    assert sorted({r for _, r in grid.rounds_seen}) == [3, 4]
    assert [r for r, _ in ends] == [3, 4]
    np.testing.assert_allclose(ends[0][1], np.full(3, 1.5))  # mean of a (+1) and b (+2); c never answered
    np.testing.assert_allclose(to_numpy(final)["w"], np.full(3, 3.0))
    assert [(r, site) for r, site, _ in strategy.failed] == [(3, "c"), (4, "c")]
    assert "no train reply within round-timeout 5 s" in strategy.failed[0][2]
    # c's evaluations of rounds 2 and 3 rode in the train messages it never answered; the last round's own
    # evaluate message it answered. a and b evaluated 2 (in train 3), 3 (in train 4) and 4 (on its own).
    assert set(strategy.sites["c"].evaluate) == {4} and not strategy.sites["c"].train
    assert set(strategy.sites["a"].evaluate) == {2, 3, 4} and set(strategy.sites["a"].train) == {3, 4}
    assert [(r, first) for r, first, node in grid.evaluate_first if node == 1] == [(3, 2), (4, 3)]


def test_one_message_per_round_the_last_evaluation_on_its_own():
    grid = FakeGrid()
    strategy = FedRad(expected=spec_of(SHARED), min_sites=2)
    run_rounds(grid, strategy, from_numpy(SHARED), first=1, last=3, timeout=5.0, train_config=ConfigRecord({}),
               evaluate_config=ConfigRecord({}))
    to_a = [(kind, r) for kind, r, node in grid.sent_to if node == 1]
    assert to_a == [("train", 1), ("train", 2), ("train", 3), ("evaluate", 3)]  # N + 1 messages, not 2N
    assert [(r, first) for r, first, node in grid.evaluate_first if node == 1] == [(1, None), (2, 1), (3, 2)]
    assert set(strategy.sites["a"].evaluate) == {1, 2, 3}
    sent = strategy.sites["a"].bytes_sent  # each part counted in its own round, whichever message carried it
    assert sent[1] == sent[2] == sent[3] > 0


def test_a_site_that_refuses_to_train_still_evaluates_and_its_code_is_kept():
    grid = FakeGrid(refuses_training=(2,))
    strategy = FedRad(expected=spec_of(SHARED), min_sites=1)
    final = run_rounds(grid, strategy, from_numpy(SHARED), first=1, last=3, timeout=5.0,
                       train_config=ConfigRecord({}), evaluate_config=ConfigRecord({}))
    assert set(strategy.sites["b"].evaluate) == {1, 2, 3} and not strategy.sites["b"].train
    # round 1: a train message of its own, refused with an error; rounds 2, 3: refused beside the evaluation
    assert [(r, why) for r, site, why in strategy.failed if site == "b"] == [
        (r, "small-count (incident 0123456789ab)") for r in (1, 2, 3)]
    np.testing.assert_allclose(to_numpy(final)["w"], np.full(3, 3.0))  # only a trained (+1 a round; c never answers)


def test_no_rounds_left_runs_nothing():
    grid = FakeGrid()
    strategy = FedRad(expected=spec_of(SHARED))
    arrays = from_numpy(SHARED)
    assert run_rounds(grid, strategy, arrays, first=3, last=2, timeout=1.0, train_config=ConfigRecord({}),
                      evaluate_config=ConfigRecord({})) is arrays
    assert grid.rounds_seen == []


def run(grid, *, rejoin_wait, first=3, last=4, asked_before=None):
    strategy = FedRad(expected=spec_of(SHARED), min_sites=2)
    run_rounds(grid, strategy, from_numpy(SHARED), first=first, last=last, timeout=5.0, rejoin_wait=rejoin_wait,
               train_config=ConfigRecord({}), evaluate_config=ConfigRecord({}), asked_before=asked_before)
    return {(kind, r) for kind, r, node in grid.sent_to if node == 3}


def test_a_site_lost_in_a_round_is_waited_for_before_the_next(caplog):
    caplog.set_level("INFO", logger="fedrad.coordinator")
    c_got = run(FakeGrid(offline_s=0.5), rejoin_wait=30.0)
    assert ("train", 4) in c_got  # back after 0.5 s: round 4 waited for it
    assert "round 4: waiting up to 30 s for c to reconnect" in caplog.text
    assert "round 4: c reconnected; the round starts" in caplog.text
    # without the wait round 4 starts while c is still offline and leaves it out
    assert ("train", 4) not in run(FakeGrid(offline_s=0.5), rejoin_wait=0.0)


def test_a_site_that_does_not_come_back_is_waited_for_once(caplog):
    caplog.set_level("INFO", logger="fedrad.coordinator")
    c_got = run(FakeGrid(offline_s=1e6), rejoin_wait=0.3, last=6)
    assert not any(kind == "train" and r > 3 for kind, r in c_got)
    assert caplog.text.count("waiting up to") == 1  # before round 4 only: c was not in rounds 4 and 5
    assert "round 4: c not back after 0.3 s; the round goes on without them" in caplog.text


def test_a_site_lost_in_the_exchange_before_round_one_is_waited_for_by_name(caplog):
    caplog.set_level("INFO", logger="fedrad.coordinator")
    asked = {1: "a", 2: "b", 3: "c"}  # the reference exchange's sites; c dropped out during it
    assert ("train", 1) in run(FakeGrid(offline_s=0.5, start_offline=True), rejoin_wait=30.0, first=1, last=1,
                               asked_before=asked)
    assert "round 1: waiting up to 30 s for c to reconnect" in caplog.text
    assert ("train", 1) not in run(FakeGrid(offline_s=0.5, start_offline=True), rejoin_wait=30.0, first=1, last=1)


class PackingGrid(FakeGrid):
    """Sites as their ClientApp is: a message's records arrive packed and the reply's leave packed.

    Site b's packed reply lies about its bytes (a malformed update); with `plain`, site a answers unpacked.
    """

    def __init__(self, plain=False):
        super().__init__()
        self.arrived, self.plain = [], plain

    def send_and_receive(self, messages, *, timeout):
        for msg in messages:
            self.arrived.append(list(msg.content))
            msg.content = unpack_content(msg.content)
        replies = super().send_and_receive(messages, timeout=timeout)
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error() or (node == 1 and self.plain):
                continue
            reply.content = pack_content(reply.content)
            if node == 2:
                wire = reply.content[WIRE]
                layout = json.loads(wire[LAYOUT].numpy().tobytes())
                for name, kind, body in layout:
                    if kind == "arrays":
                        body[0][2] = [body[0][2][0] + 1]  # one float more than the buffer holds
                wire[LAYOUT] = Array(np.frombuffer(json.dumps(layout).encode(), dtype=np.uint8))
        return replies


@pytest.mark.parametrize("plain", [False, True])
def test_messages_travel_packed_and_a_packed_reply_that_lies_is_rejected_naming_the_site(plain):
    shared = {"w": np.zeros(3, np.float32), "b": np.zeros(2, np.float32)}
    grid, ends = PackingGrid(plain=plain), []
    strategy = FedRad(expected=spec_of(shared), min_sites=1)
    run_rounds(grid, strategy, from_numpy(shared), first=1, last=2, timeout=5.0, train_config=ConfigRecord({}),
               evaluate_config=ConfigRecord({}), on_round_end=lambda r, arrays: ends.append(to_numpy(arrays)))
    assert grid.arrived and all(names == [WIRE] for names in grid.arrived)  # never the records one by one
    assert [(r, site) for r, site, _ in strategy.rejected] == [(1, "b"), (2, "b")]
    assert "malformed reply: record 'arrays': the layout describes more than the buffer's 20 bytes" in \
        strategy.rejected[0][2]
    np.testing.assert_array_equal(ends[-1]["w"], np.full(3, 2.0))  # a's update alone (+1 a round), unpacked exactly
    np.testing.assert_array_equal(ends[-1]["b"], np.full(2, 2.0))


class OneReplyAPull(Grid):
    """A Flower Grid (the coordinator pulls from it) whose packed replies come one per pull.

    The sites are `PackingGrid`'s; at each pull it notes which earlier replies still hold
    their packed content.
    """

    def __init__(self):
        self.sites, self.queue, self.given, self.still_packed = PackingGrid(), [], [], []

    def set_run(self, run):
        pass

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, *args, **kwargs):
        raise NotImplementedError

    def get_node_ids(self):
        return self.sites.get_node_ids()

    def get_nodes(self):
        return self.sites.get_nodes()

    def push_messages(self, messages):
        messages = list(messages)
        self.queue += self.sites.send_and_receive(messages, timeout=1.0)
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, message_ids):
        self.still_packed.append(sum(is_packed(r.content) for r in self.given if not r.has_error()))
        if not self.queue:
            return []
        self.given.append(self.queue.pop(0))
        return [self.given[-1]]

    def send_and_receive(self, messages, *, timeout=None):
        raise AssertionError("the coordinator pushes and pulls itself (short polls, unpacking on arrival)")


def test_replies_are_unpacked_as_they_arrive_and_a_malformed_one_is_still_named():
    """Unpacked only once all were in, every packed and unpacked update were held at once (+0.6 GB, 100 sites)."""
    shared = {"w": np.zeros(3, np.float32), "b": np.zeros(2, np.float32)}
    grid = OneReplyAPull()
    strategy = FedRad(expected=spec_of(shared), min_sites=1)
    run_rounds(grid, strategy, from_numpy(shared), first=1, last=1, timeout=0.3, train_config=ConfigRecord({}),
               evaluate_config=ConfigRecord({}))
    assert len(grid.given) >= 3
    assert grid.still_packed and all(n <= 1 for n in grid.still_packed)  # only b's malformed reply stays packed
    assert [(r, site) for r, site, _ in strategy.rejected] == [(1, "b")]
    assert "malformed reply: record 'arrays'" in strategy.rejected[0][2]
