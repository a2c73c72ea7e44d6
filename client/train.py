"""Local training and evaluation at one site. No Flower here: plain PyTorch on arrays.

The model arrives with the coordinator's shared weights and the site's own BatchNorm
already loaded (see `client.state`); this module only runs epochs and predictions.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from torch.nn import functional as F

from common.bn import recalibrate_bn
from common.config import RunConfig
from common.efficientnet_lite import EfficientNetLite0, efficientnet_lite0
from common.finetune import freeze_units, make_optimizer, param_groups, set_train_mode
from common.metrics import classification_metrics

NUM_CLASSES = 2


def build_model(cfg: RunConfig) -> EfficientNetLite0:
    """Pretrained EfficientNet-Lite0 with a 2-class head (seeded), frozen up to `freeze_blocks`."""
    model = efficientnet_lite0(pretrained=True, num_classes=NUM_CLASSES, seed=cfg.seed)
    freeze_units(model, cfg.freeze_blocks)
    return model


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random flips and 90-degree rotations: exact on the pixel grid, no interpolation.

    A lesion has no preferred orientation in the axial plane, so these are label-preserving.
    """
    flips = torch.rand(2, generator=generator) < 0.5
    if flips[0]:
        x = torch.flip(x, dims=[-1])
    if flips[1]:
        x = torch.flip(x, dims=[-2])
    k = int(torch.randint(0, 4, (1,), generator=generator))
    return torch.rot90(x, k, dims=[-2, -1])


def fit(model: EfficientNetLite0, x: np.ndarray, y: np.ndarray, cfg: RunConfig, *, seed: int) -> dict[str, float]:
    """Train the unfrozen part for `cfg.local_epochs` epochs; return mean loss and timing.

    Frozen units stay in eval mode (their BN keeps the pretrained statistics); trainable
    units' BN layers are re-estimated on this site's training images after the last epoch
    (`recalibrate_bn`), so evaluation normalises with this site's statistics (FedBN).
    """
    n = len(y)
    if n < 2:
        raise ValueError(f"A site needs at least 2 labelled training images to train; got {n}.")
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout draws from torch's global generator: seed it too, so runs repeat exactly
    optimizer = make_optimizer(model, param_groups(model, lr_max=cfg.lr_max, lr_decay=cfg.lr_decay),
                               cfg.weight_decay)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y).long()
    set_train_mode(model, cfg.freeze_blocks)
    losses: list[float] = []
    start = time.perf_counter()
    for _ in range(cfg.local_epochs):
        order = torch.randperm(n, generator=generator)
        for i in range(0, n, cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            if len(idx) < 2:  # BatchNorm cannot train on a single image
                continue
            logits = model(augment(xs[idx], generator))
            loss = F.cross_entropy(logits, ys[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    # near-equal batches: the cumulative average then weights every image (almost) equally
    recalibrate_bn(model, torch.tensor_split(xs, math.ceil(n / cfg.batch_size)))
    return {"train-loss": float(np.mean(losses)), "seconds": time.perf_counter() - start}


@torch.no_grad()
def predict_proba(model: EfficientNetLite0, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """P(malignant | image) for each image, in eval mode."""
    model.eval()
    out = [F.softmax(model(torch.from_numpy(x[i:i + batch_size])), dim=1)[:, 1]
           for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)


def evaluate(model: EfficientNetLite0, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Site-level aggregates of the test split; per-image predictions never leave this function."""
    return classification_metrics(y, predict_proba(model, x))
