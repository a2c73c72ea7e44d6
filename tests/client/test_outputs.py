import dataclasses

import numpy as np
import pytest
import torch

from fedrad.client.features import SiteInputs
from fedrad.client.outputs import SiteOutputs
from fedrad.client.train import pixel_inputs
from fedrad.common.config import RunConfig
from fedrad.common.model import build_model

CPU = torch.device("cpu")


def test_each_split_runs_once_and_gives_the_models_logits_and_pooled_features():
    model = build_model(RunConfig(freeze_blocks=10)).eval()
    rng = np.random.default_rng(0)
    x_train, x_test = (rng.uniform(-1, 1, (n, 3, 32, 32)).astype(np.float32) for n in (5, 3))
    calls = []
    test = pixel_inputs(model, x_test, 1, CPU)
    test = dataclasses.replace(test, forward=lambda h: calls.append(len(h)) or model(h))
    outputs = SiteOutputs(model, SiteInputs(pixel_inputs(model, x_train, 1, CPU), test), CPU)
    logits, features = outputs("test")
    assert outputs("test")[0] is logits and calls == [3]  # the second use ran nothing
    with torch.no_grad():
        x = torch.from_numpy(x_test)
        np.testing.assert_allclose(logits, model(x).double().numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(features, model.features(x).double().numpy(), rtol=1e-5, atol=1e-6)
    stacked = outputs.features("train", "test")
    assert stacked.shape == (8, 1280) and np.array_equal(stacked[5:], features)
    assert outputs("unlabelled")[0].shape == (0, 2)  # absent split: empty, not an error
    with pytest.raises(ValueError, match="unknown split"):
        outputs("validation")
