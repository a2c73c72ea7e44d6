"""A site never seen in training: the global model with pooled BN, or with AdaBN on its own images.

The coordinator's global model (`fedrad.server.global_model`) holds the shared weights and, per
adapted BN layer, the statistics pooled over the training sites (law of total variance).
A new hospital has two choices, both measurable here:

- ``pooled``: normalise with the pooled statistics. No data of its own is needed, but its
  scanner may put its activations outside the pooled distribution.
- ``adabn``: re-estimate the same BN layers' statistics from its own images (Li et al.
  2016, AdaBN): forward passes only, no label, no gradient. Costs one pass over a few dozen
  unlabelled images and follows the site's own scanner.

In ``fedbn`` runs the BN affine parameters never left the sites, so the global model has
none: the pretrained ones are used. ``silobn`` shares them, which is why leave-one-site-out
defaults to silobn (`fedrad.lab.loso`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import torch

from fedrad.client.dataset import SiteData
from fedrad.client.features import adapt_prefix_bn
from fedrad.client.train import pick_device, pixel_inputs, predict_proba
from fedrad.common.bn import recalibrate_bn
from fedrad.common.config import RunConfig
from fedrad.common.efficientnet_lite import EfficientNetLite0
from fedrad.common.finetune import first_trainable_unit
from fedrad.common.metrics import classification_metrics
from fedrad.common.model import build_model

BNChoice = Literal["pooled", "adabn"]


def unlabelled_images(data: SiteData) -> np.ndarray:
    """The images AdaBN may look at: unlabelled rows and the training split, labels never read."""
    return np.concatenate([data.x_unlabelled, data.x_train]) if len(data.x_unlabelled) else data.x_train


def global_model_for_site(config: Mapping[str, Any], weights: Mapping[str, np.ndarray]) -> tuple[RunConfig,
                                                                                       EfficientNetLite0]:
    """Build the backbone of the run's config and load the shared weights plus the pooled BN statistics.

    `config` is the run config saved with the global model, `weights` its shared weights
    together with the pooled BN statistics (`fedrad.server.global_model.GlobalModel.site_weights`).
    """
    cfg = RunConfig.from_run_config(config)
    model = build_model(cfg, pick_device(cfg.device))
    state = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in weights.items()}
    unexpected = model.load_state_dict(state, strict=False).unexpected_keys
    if unexpected:
        raise ValueError(f"the global model holds weights this backbone does not have: {unexpected[:5]}; "
                         "it was saved by a different fedrad version or config.")
    return cfg, model


def evaluate_unseen(config: Mapping[str, Any], weights: Mapping[str, np.ndarray], data: SiteData, *,
                    bn: BNChoice) -> dict[str, float]:
    """Test-split metrics of the global model at `data`'s site with pooled BN or AdaBN.

    With `prefix-bn = "site"` every site normalises the frozen prefix with its own
    statistics, so the new site does too, in both cases (it is part of the model's recipe).
    """
    if bn not in ("pooled", "adabn"):
        raise ValueError(f"bn must be 'pooled' or 'adabn'; got {bn!r}.")
    cfg, model = global_model_for_site(config, weights)
    images = unlabelled_images(data)
    if (bn == "adabn" or cfg.prefix_bn == "site") and len(images) < 2:
        raise ValueError(f"site {data.name}: AdaBN needs at least 2 images; it has {len(images)}.")
    start = first_trainable_unit(cfg.freeze_blocks)
    if cfg.prefix_bn == "site" and start > 0:
        adapt_prefix_bn(model, images, start, cfg.batch_size)
    device = pick_device(cfg.device)
    if bn == "adabn":
        batches = torch.tensor_split(torch.from_numpy(images), math.ceil(len(images) / cfg.batch_size))
        recalibrate_bn(model, (b.to(device) for b in batches))  # the same layers the training sites re-estimated
    p = predict_proba(model, pixel_inputs(model, data.x_test, 1, device), device=device)
    return classification_metrics(data.y_test, p)
