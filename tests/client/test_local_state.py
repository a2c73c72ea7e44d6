"""A site's BN on its own disk: per round, atomic, newest before / up to a round."""

import torch

from fedrad.client.local_state import LocalStateStore


def test_latest_before_a_round_and_pruning(tmp_path):
    store = LocalStateStore(tmp_path, "fed/1", keep=2)
    assert store.latest(5) is None
    for r in (1, 2, 3):
        store.save(r, {"bn.running_mean": torch.full((3,), float(r))})
    assert store.rounds() == [2, 3]  # only the newest two are kept
    assert store.folder.name == "fed_1"  # the id cannot escape the work folder
    r, tensors = store.latest(2)  # training round 3 after a coordinator restart starts from round 2's BN
    assert r == 2 and torch.equal(tensors["bn.running_mean"], torch.full((3,), 2.0))
    assert store.latest(9)[0] == 3 and store.latest(1) is None
    assert not [p for p in store.folder.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_each_federation_has_its_own_state(tmp_path):
    LocalStateStore(tmp_path, "one").save(1, {"x": torch.ones(1)})
    assert LocalStateStore(tmp_path, "two").latest(5) is None
