"""One message per round: the evaluation of the last global model rides in the next train message.

Flower's round is two round trips: a train message, then an evaluate message of the new
global model, each carrying the same shared weights (5.66 MB by default) through every hop
of a deployment. But the evaluate message of round r and the train message of round r + 1
carry the same global model to the same sites, and a site's own BN does not change between
them. So from round 2 on the coordinator sends one train message that also asks the site to
evaluate the model it carries first, as round r − 1 (record `evaluate-first`); the site
evaluates, then trains, and replies with both. Only the last round's evaluation (with the
calibration, label shift and audit) is still a message of its own: N + 1 messages for N
rounds instead of 2N.

The reply keeps the two apart: the train reply's records as they are, the evaluate reply's
records under `evaluate.<record>`; a site that evaluated but may not train (too few
labelled images, its policy) puts the refusal's code and incident id in `train-refused`
instead of the train records. Each part is checked by the site against its own whitelist
(the train reply's and the evaluate reply's, unchanged), and the coordinator splits them
back into the two replies Flower's loop would have received. Results are those of the two
messages: the site evaluates the same model with the same BN, and trains from the same
state with the same seed.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, RecordDict

EVALUATE_FIRST = "evaluate-first"  # coordinator -> site, in a train message: {"server-round": r - 1}
PREFIX = "evaluate."  # site -> coordinator: the evaluate reply's records, renamed
TRAIN_REFUSED = "train-refused"  # site -> coordinator: {"code": reason code name, "incident": id}


class RideError(ValueError):
    """A reply whose parts do not fit together (the coordinator treats it as a malformed reply)."""


def evaluate_round(content: RecordDict) -> int | None:
    """The round a train message asks the site to evaluate first (None: a plain train message)."""
    if EVALUATE_FIRST not in content:
        return None
    value = content[EVALUATE_FIRST].get("server-round")  # type: ignore[union-attr]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RideError(f"'{EVALUATE_FIRST}' must give a server-round >= 1, got {value!r}")
    return value


def ask(content: RecordDict, evaluate: RecordDict, server_round: int) -> None:
    """Turn a train message's content into one that asks for the evaluation of `server_round` first.

    `evaluate`: the content of the evaluate message Flower's loop would have sent; records the
    train message does not already carry (the training prior for label shift) are added.
    """
    for name, record in evaluate.items():
        if name not in content:
            content[name] = record
    content[EVALUATE_FIRST] = ConfigRecord({"server-round": server_round})


def combine(train: RecordDict | None, evaluate: RecordDict, refused: tuple[str, str] | None = None) -> RecordDict:
    """The reply of a train message with an evaluation first: `train` (or the refusal), then `evaluate`."""
    if (train is None) == (refused is None):
        raise RideError("give either the train reply's content or the refusal of training")
    out = RecordDict(dict(train.items()) if train is not None else {})
    if refused is not None:
        out[TRAIN_REFUSED] = ConfigRecord({"code": refused[0], "incident": refused[1]})
    for name, record in evaluate.items():
        out[PREFIX + name] = record
    return out


def split(content: RecordDict) -> tuple[RecordDict | None, tuple[str, str] | None, RecordDict]:
    """(train content or None, (code, incident) of a refused training or None, evaluate content)."""
    evaluate = RecordDict({name[len(PREFIX):]: r for name, r in content.items() if name.startswith(PREFIX)})
    train = {name: r for name, r in content.items() if not name.startswith(PREFIX) and name != TRAIN_REFUSED}
    if not len(evaluate):
        raise RideError("the reply holds no evaluate records")
    if TRAIN_REFUSED not in content:
        return RecordDict(train), None, evaluate
    if train:
        raise RideError(f"a reply with '{TRAIN_REFUSED}' may hold no train records, got {sorted(train)}")
    record = content[TRAIN_REFUSED]
    code, incident = record.get("code"), record.get("incident")  # type: ignore[union-attr]
    if not isinstance(code, str) or not isinstance(incident, str):
        raise RideError(f"'{TRAIN_REFUSED}' must give a code and an incident id")
    return None, (code, incident), evaluate


def rides(content: RecordDict) -> bool:
    """Whether a reply carries an evaluation beside its training."""
    return any(name.startswith(PREFIX) for name in content)
