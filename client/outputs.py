"""What the model says about a site's images: logits and penultimate features, per split.

An evaluate message needs the test split's logits for its metrics, the train and test
features for the shift moments and, in the last round, the unlabelled and train outputs
for the label-shift analysis. `SiteOutputs` runs the model once per split and message and
hands the same arrays to each of them. Features are captured with a forward hook on the
classifier, so cached and pixel inputs work alike. No Flower here.
"""

from __future__ import annotations

import numpy as np
import torch

from fedrad.client.features import SiteInputs
from fedrad.client.train import Inputs, autocast, bag_mean
from fedrad.common.efficientnet_lite import EfficientNetLite0
from fedrad.common.model import NUM_CLASSES

SPLITS = ("train", "test", "unlabelled")


@torch.no_grad()
def model_outputs(model: EfficientNetLite0, inputs: Inputs | None, device: torch.device,
                  batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Logits (N, K) and penultimate features (N, D), float64, of images (view 0), in eval mode.

    A slice bag (`inputs.n_slices` > 1) gives each patient the mean over its k slices of both.
    """
    features: list[torch.Tensor] = []
    logits: list[torch.Tensor] = []
    n = 0 if inputs is None else inputs.n
    if inputs is None or n == 0:
        return np.zeros((0, NUM_CLASSES)), np.zeros((0, model._fc.in_features))
    hook = model._fc.register_forward_hook(lambda _m, args, _out: features.append(args[0].float().cpu()))
    model.eval()
    try:
        for i in range(0, n, batch_size):
            with autocast(device):  # a slice bag: the mean of its k slices' outputs (`bag_mean`), features too
                out = bag_mean(inputs, torch.arange(i, min(i + batch_size, n)),
                               lambda x: inputs.forward(x).float().cpu())
            if inputs.n_slices > 1:
                features[-inputs.n_slices:] = [torch.stack(features[-inputs.n_slices:]).mean(dim=0)]
            logits.append(out)
    finally:
        hook.remove()
    return torch.cat(logits).double().numpy(), torch.cat(features).double().numpy()


class SiteOutputs:
    """`model_outputs` of each split of `inputs`, computed on first use and kept for the message.

    The model must not change while this is in use (evaluation only).
    """

    def __init__(self, model: EfficientNetLite0, inputs: SiteInputs, device: torch.device) -> None:
        self.model, self.inputs, self.device = model, inputs, device
        self._done: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def __call__(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(logits, features) of `split` ("train", "test" or "unlabelled"; an absent split is empty)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; one of {SPLITS}")
        if split not in self._done:
            self._done[split] = model_outputs(self.model, getattr(self.inputs, split), self.device)
        return self._done[split]

    def features(self, *splits: str) -> np.ndarray:
        """Penultimate features of `splits`, stacked in that order."""
        return np.concatenate([self(split)[1] for split in splits])
