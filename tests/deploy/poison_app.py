"""A ClientApp for the poisoning test: the real site, whose update is corrupted after it leaves the handler.

Node config `test-poison` picks the attack: `nan` (a NaN weight), `shape` (a transposed
weight) or `scale` (the update's step from the global model times 1000). The corruption
happens after the real handler and its egress check, as a compromised site would do it
(and before the reply is packed for the wire, as the real site packs it); only the
coordinator's validation stands between it and the global model.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

import fedrad.client.app as site
from fedrad.common.records import ARRAYS, from_numpy, to_numpy

app = ClientApp(mods=[site.on_the_wire])  # arrives and leaves packed, as the real site's (fedrad.common.packing)


def poison(kind: str, update: dict[str, np.ndarray], sent: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    key = "_fc.weight"
    out = dict(update)
    if kind == "nan":
        out[key] = update[key].copy()
        out[key].flat[0] = np.nan
    elif kind == "shape":
        out[key] = np.ascontiguousarray(update[key].T)
    elif kind == "scale":
        out = {k: (sent[k] + 1000.0 * (v - sent[k])).astype(v.dtype) for k, v in update.items()}
    else:
        raise ValueError(f"unknown test-poison {kind!r}")
    return out


@app.train()
def train(msg: Message, context: Context) -> Message:
    reply = site.train(msg, context)
    kind = str(context.node_config.get("test-poison", ""))
    if not kind:
        return reply
    arrays = poison(kind, to_numpy(reply.content[ARRAYS]), to_numpy(msg.content[ARRAYS]))
    content = RecordDict({**dict(reply.content.items()), ARRAYS: from_numpy(arrays)})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return site.evaluate_(msg, context)


@app.query()
def query(msg: Message, context: Context) -> Message:
    return site.query(msg, context)
