"""The round loop: rounds `first..last` of train + evaluate, with a hook after each round.

One message per round (`fedrad.common.piggyback`): from round 2 on, the evaluation of the
previous round's global model rides in the train message, and only the last round's
evaluation is a message of its own. The strategy still sees what Flower's loop gives it:
the train replies of each round and the evaluate replies of each round, split back apart.

Flower's `Strategy.start` always runs rounds 1..N. A coordinator that resumes from a
checkpoint must run rounds k+1..N under their true numbers (sites seed their shuffling and
name their BN files by round), and must save its state after every round. This is the same
loop as `Strategy.start` (configure -> send_and_receive -> aggregate, for training, then
for evaluation), over the strategy's own methods, with both of those added.

A site that does not answer within `timeout` (lost mid-round, killed, network gone) is
logged with its name when known and recorded in the strategy's failed replies; the round
goes on with the replies that came, and the strategy's `min-sites` decides whether they
are enough to move the global model. Before the next round the coordinator waits up to
`rejoin_wait` seconds for such a site to reconnect (see `_await_rejoin`).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Mapping

from flwr.app import ArrayRecord, ConfigRecord, Error, Message
from flwr.serverapp import Grid

from fedrad.common.codes import CODES, reason
from fedrad.common.flower_tools import quick_object_pulls
from fedrad.common.packing import PackingError, pack_contents, unpack_content
from fedrad.common.piggyback import RideError, ask, rides, split
from fedrad.server.strategy import FedRad

log = logging.getLogger("fedrad.coordinator")


def registered_names(grid: Grid) -> dict[int, str]:
    """Node id -> the name its site was registered under (deployment); simulation nodes have none."""
    return {node.node_id: node.name for node in grid.get_nodes() if getattr(node, "name", "")}


def _learn_names(strategy: FedRad, names: Mapping[int, str]) -> None:
    """Remember each node's site name (first one wins; "" means none known)."""
    for node, name in names.items():
        if name:
            strategy.node_names.setdefault(node, name)


def _names(strategy: FedRad, nodes: set[int]) -> str:
    """Site names where known (the registry's, in deployment), else `node-<id>`."""
    return ", ".join(sorted(strategy.node_names.get(node, f"node-{node}") for node in nodes))


def _record_lost(strategy: FedRad, server_round: int, node: int, reason: str) -> None:
    name = _names(strategy, {node})
    strategy.failed.append((server_round, name, reason))
    log.warning("round %d: %s: %s; the round goes on with the others", server_round, name, reason)


GRID_POLL_S = 0.1  # seconds between the coordinator's asks for replies (Flower's deployment Grid: 3 s)


class PhaseClock:
    """Where each round's time goes on the coordinator: seconds per phase, for the log and the report.

    Phases: `rejoin` (waiting for lost sites), `configure` (building the messages), `push`
    (handing them and their arrays to the SuperLink), `replies` (waiting for the sites),
    `aggregate`, `files` (checkpoint, global model). What the sites do is in their own logs.
    """

    def __init__(self) -> None:
        self.rounds: dict[int, dict[str, float]] = {}
        self._phases: dict[str, float] = {}
        self._last = time.perf_counter()

    def start(self, server_round: int) -> None:
        self._phases = self.rounds.setdefault(server_round, {})
        self._last = time.perf_counter()

    def mark(self, phase: str) -> None:
        """The time since the last mark was spent in `phase` (added to it, if it came before)."""
        now = time.perf_counter()
        self._phases[phase] = round(self._phases.get(phase, 0.0) + now - self._last, 3)
        self._last = now

    def line(self, server_round: int) -> str:
        return ", ".join(f"{k} {v:.2f} s" for k, v in self.rounds.get(server_round, {}).items())


def send_and_receive(grid: Grid, messages: list[Message], timeout: float, *, poll: float | None = None,
                     clock: PhaseClock | None = None) -> list[Message]:
    """Push packed messages, then pull every `poll` s, unpacking each reply as it arrives.

    Why pull here instead of `Grid.send_and_receive`: Flower 1.42's deployment Grid
    (`HttpGrid`) sleeps a fixed 3 s between pulls (not settable), so a reply waits 1.5 s on
    average after it has reached the SuperLink. The ServerApp runs beside the SuperLink, so
    asking every `GRID_POLL_S` costs a few small local requests (the Simulation Engine's own
    Grid asks every 0.1 s too).

    Why unpack on arrival: a packed reply and its unpacked records are two copies of a site's
    update. Unpacked after all replies are in, the coordinator of 100 virtual sites held both
    for every site at once (driver peak +0.6 GB over messages that were never packed,
    BENCHMARKS.md); unpacked as each arrives, the packed copy goes at once. A reply whose
    content does not unpack is left as it came: the caller's `unpacked` raises its
    `PackingError` again and names the site. A grid that cannot push and pull (a test's
    stand-in) is asked through its `send_and_receive`, and its replies are unpacked by the caller.
    """
    from flwr.superlink.grid.http_grid import HttpGrid

    clock = clock or PhaseClock()
    poll = GRID_POLL_S if poll is None else poll
    contents = [msg.content for msg in messages]
    for msg, packed in zip(messages, pack_contents(contents)):  # one buffer per message (fedrad.common.packing)
        msg.content = packed
    try:
        if not hasattr(grid, "push_messages"):  # a stand-in offering only send_and_receive: used as it is
            replies = list(grid.send_and_receive(messages, timeout=timeout))
            clock.mark("replies")
            return replies
        if isinstance(grid, HttpGrid):
            quick_object_pulls(sys.modules[type(grid).__module__], poll)  # replies' arrays: 20 ms retries
        pending = set(grid.push_messages(messages))
        clock.mark("push")
    finally:  # the caller's messages keep their records as built (their ids were set as pushed)
        for msg, content in zip(messages, contents):
            msg.content = content
    end = time.monotonic() + timeout
    replies: list[Message] = []
    while pending:
        for reply in grid.pull_messages(pending):
            pending.discard(reply.metadata.reply_to_message_id)
            try:
                replies.append(unpacked(reply))
            except PackingError:
                replies.append(reply)
        if not pending or time.monotonic() >= end:
            break
        time.sleep(poll)
    clock.mark("replies")
    return replies


def unpacked(reply: Message) -> Message:
    """A reply with its packed content unpacked (in place); `PackingError` if the layout does not describe its bytes."""
    if not reply.has_error():
        reply.content = unpack_content(reply.content)
    return reply


def _exchange(grid: Grid, strategy: FedRad, messages: list[Message], server_round: int, stage: str,
              timeout: float, clock: PhaseClock | None = None) -> list[Message]:
    """Send, wait up to `timeout`, and record (by site name) the sites that did not reply.

    Two ways a site is lost: no reply before the timeout, or an error reply the SuperLink
    makes for it once its heartbeats stop (Node Unavailable). Both are recorded here; the
    strategy sees only what the sites themselves sent.
    """
    _learn_names(strategy, registered_names(grid))  # so a site lost in its first round is named
    replies = send_and_receive(grid, messages, timeout, clock=clock)
    dst_of = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}  # ids are set when pushed
    answered, kept = set(), []
    for reply in replies:
        node = dst_of.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        answered.add(node)
        if reply.has_error() and reply.metadata.src_node_id != node:  # the SuperLink answered for the site
            _record_lost(strategy, server_round, node, f"{stage}: {reply.error.reason}")
            continue
        try:
            kept.append(unpacked(reply))
        except PackingError as err:
            strategy.reject(server_round, _names(strategy, {node}), f"malformed reply: {err}")
    for node in sorted(set(dst_of.values()) - answered):
        _record_lost(strategy, server_round, node, f"no {stage} reply within round-timeout {timeout:g} s")
    return kept


def _await_rejoin(grid: Grid, strategy: FedRad, expected: set[int], wait: float, server_round: int) -> None:
    """Give the sites of the last round (or exchange) that are offline now up to `wait` s to reconnect.

    Why: a crashed site that its service manager restarts is accepted again only once its
    old session has expired, which is also when the round it missed closes (Node
    Unavailable). Started at once, the next round would be sent a few seconds before the
    site is back and leave it out for a whole round. A site that does not come back in time
    is not waited for again (it was not in this round), so a site gone for good costs one
    wait; it takes part again from the first round that starts after it reconnects.
    """
    missing = expected - set(grid.get_node_ids())
    if not missing or wait <= 0:
        return
    lost = missing
    log.info("round %d: waiting up to %g s for %s to reconnect (rejoin-wait)", server_round, wait,
             _names(strategy, lost))
    deadline = time.monotonic() + wait
    while missing and (left := deadline - time.monotonic()) > 0:
        time.sleep(min(1.0, left))
        missing = expected - set(grid.get_node_ids())
    if missing:
        log.warning("round %d: %s not back after %g s; the round goes on without them", server_round,
                    _names(strategy, missing), wait)
    else:
        log.info("round %d: %s reconnected; the round starts", server_round, _names(strategy, lost))


def ask_evaluation_first(strategy: FedRad, grid: Grid, sent: list[Message], server_round: int,
                         arrays: ArrayRecord, evaluate_config: ConfigRecord) -> int | None:
    """Make this round's train messages ask for the evaluation of the previous round's model first.

    Returns the round evaluated (None: nothing to evaluate: round 1, or already evaluated).
    """
    pending = server_round - 1
    if pending < 1 or strategy.evaluated(pending):
        return None
    evaluate = {m.metadata.dst_node_id: m for m in strategy.configure_evaluate(pending, arrays, evaluate_config, grid)}
    for msg in sent:
        if msg.metadata.dst_node_id in evaluate:
            ask(msg.content, evaluate[msg.metadata.dst_node_id].content, pending)
    return pending


def split_replies(strategy: FedRad, server_round: int, sent: list[Message], replies: list[Message]
                  ) -> tuple[list[Message], list[Message]]:
    """(train replies, evaluate replies) of one round's replies, the evaluations that rode in them split off.

    A site that evaluated but refused to train becomes a failed train reply with its code, as
    if it had answered two messages. A reply whose parts do not fit is rejected whole.
    """
    by_id = {m.metadata.message_id: m for m in sent}
    trains, evaluations = [], []
    for msg in replies:
        question = by_id.get(msg.metadata.reply_to_message_id)
        if msg.has_error() or question is None or not rides(msg.content):
            trains.append(msg)
            continue
        try:
            train, refused, evaluation = split(msg.content)
        except RideError as err:
            strategy.reject(server_round, _names(strategy, {msg.metadata.src_node_id}), f"malformed reply: {err}")
            continue
        evaluations.append(Message(content=evaluation, reply_to=question))
        if train is not None:
            trains.append(Message(content=train, reply_to=question))
        else:
            code, incident = refused if refused[0] in CODES else ("internal", refused[1])
            trains.append(Message(Error(CODES[code], reason(code, incident)), reply_to=question))
    return trains, evaluations


def run_rounds(grid: Grid, strategy: FedRad, arrays: ArrayRecord, *, first: int, last: int, timeout: float,
               train_config: ConfigRecord, evaluate_config: ConfigRecord, rejoin_wait: float = 0.0,
               asked_before: Mapping[int, str] | None = None,
               on_round_end: Callable[[int, ArrayRecord], None] | None = None,
               clock: PhaseClock | None = None) -> ArrayRecord:
    """Run rounds first..last (inclusive; none when first > last); return the final global arrays.

    `asked_before`: node id -> registered name ("" if none) of the sites messaged just before
    round `first` (the reference exchange); like a round's sites, those offline when it
    starts are waited for up to `rejoin_wait` s. `clock` gets each round's phases (coordinator side).
    """
    if first > last:
        log.info("rounds 1..%d are already done (resumed from a checkpoint): nothing to train; use another "
                 "out-dir to train this experiment again", first - 1)
    _learn_names(strategy, asked_before or {})
    last_sent = set(asked_before or {})  # the sites messaged in the previous round (or exchange)
    clock = clock or PhaseClock()
    for server_round in range(first, last + 1):
        clock.start(server_round)
        _await_rejoin(grid, strategy, last_sent, rejoin_wait, server_round)
        clock.mark("rejoin")
        log.info("round %d of %d: training", server_round, last)
        sent = list(strategy.configure_train(server_round, arrays, train_config, grid))
        evaluating = ask_evaluation_first(strategy, grid, sent, server_round, arrays, evaluate_config)
        last_sent = {m.metadata.dst_node_id for m in sent}
        clock.mark("configure")
        replies = _exchange(grid, strategy, sent, server_round, "train", timeout, clock)
        if evaluating is not None:
            replies, evaluations = split_replies(strategy, server_round, sent, replies)
            strategy.aggregate_evaluate(evaluating, evaluations)
        new_arrays, _ = strategy.aggregate_train(server_round, replies)
        if new_arrays is not None:
            arrays = new_arrays
        clock.mark("aggregate")
        if server_round == last:  # the last model is evaluated in a message of its own (calibration, label shift)
            sent = list(strategy.configure_evaluate(server_round, arrays, evaluate_config, grid))
            last_sent |= {m.metadata.dst_node_id for m in sent}
            clock.mark("configure")
            replies = _exchange(grid, strategy, sent, server_round, "evaluate", timeout, clock)
            strategy.aggregate_evaluate(server_round, replies)
            clock.mark("aggregate")
        if on_round_end is not None:
            on_round_end(server_round, arrays)
        clock.mark("files")
        log.info("round %d on the coordinator: %s", server_round, clock.line(server_round))
    return arrays
