"""Which site a reply comes from: the name bound to the node that sent it, never just the name it declares.

In a deployment every node authenticates with a key that was provisioned and registered
under a site name (`fedrad register`; Flower's node authentication), and the coordinator
learns that name from its registry. A reply that declares another name is refused. Without
a registry (simulation) a node's first name is bound to it, and a second node that uses a
name already bound is refused: two nodes can never both count as one site, or overwrite
each other's log and BN-registry entries.
"""

from __future__ import annotations

from collections.abc import MutableMapping

from flwr.app import Message

from fedrad.common.records import SITE


class IdentityRefused(ValueError):
    """A reply's declared site name does not match the node that sent it."""


def declared_name(msg: Message) -> str:
    """The site name a reply declares, or `node-<id>` when it declares none."""
    if msg.has_content() and SITE in msg.content and "name" in msg.content[SITE]:
        return str(msg.content[SITE]["name"])
    return f"node-{msg.metadata.src_node_id}"


def bind(names: MutableMapping[int, str], msg: Message) -> str:
    """The reply's site name, checked against (and, on first sight, bound in) `names`: node id -> name."""
    node, declared = msg.metadata.src_node_id, declared_name(msg)
    known = names.get(node)
    if known:
        if declared != known:
            raise IdentityRefused(f"node {node} is site {known} (registered or first seen so) but its reply "
                                  f"declares {declared!r}; refused.")
        return known
    taken = [other for other, name in names.items() if name == declared and other != node]
    if taken:
        raise IdentityRefused(f"node {node} declares site name {declared!r}, already bound to node {taken[0]}; "
                              "refused.")
    names[node] = declared
    return declared
