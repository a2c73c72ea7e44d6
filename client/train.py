"""Local training and evaluation at one site. No Flower here: plain PyTorch on arrays.

The model arrives with the coordinator's shared weights and the site's own BatchNorm
already loaded; this module only runs epochs and predictions. What the trainable part
sees is an `Inputs`: either pixels, pushed through the frozen prefix on every step, or the
frozen prefix's cached outputs (`fedrad.client.features`). Both follow the same random sequence,
so cached and uncached training give the same model.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from fedrad.client.cache import dihedral
from fedrad.common.bn import recalibrate_bn
from fedrad.common.config import RunConfig
from fedrad.common.efficientnet_lite import EfficientNetLite0
from fedrad.common.finetune import make_optimizer, param_groups, set_train_mode


def pick_device(choice: str = "auto") -> torch.device:
    """CUDA when present (or asked for), else CPU."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA GPU is visible; use device='auto' or 'cpu'.")
    return torch.device("cuda" if choice in ("auto", "cuda") and torch.cuda.is_available() else "cpu")


def autocast(device: torch.device):  # noqa: ANN201 - a context manager
    """bf16 autocast on CUDA (tensor cores, no loss scaling needed); plain fp32 on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


@dataclass
class Inputs:
    """What the trainable part of the network is fed, and how it is run.

    `batch(idx, view, slices=None)` returns the input of the first trainable unit for images
    `idx` under dihedral view `view`; `forward` maps it to logits. With a slice bag
    (`slices-per-lesion` k = `n_slices` > 1: each row holds k inputs of 3 channels, largest
    lesion section first) `slices` picks one per row (a tensor like `idx`); None is slice 0.
    """

    n: int
    n_views: int
    batch: Callable[..., torch.Tensor]
    forward: Callable[[torch.Tensor], torch.Tensor]
    n_slices: int = 1


def bag_size(x: np.ndarray) -> int:
    """Slices per row of a CNN input array (N, 3k, S, S): k (1 for an ordinary 3-channel input)."""
    return x.shape[1] // 3 if x.ndim == 4 and x.shape[1] > 3 and x.shape[1] % 3 == 0 else 1


def _to(device: torch.device, array: np.ndarray) -> torch.Tensor:
    tensor = torch.from_numpy(array)
    return tensor.pin_memory() if device.type == "cuda" else tensor


def pixel_inputs(model: EfficientNetLite0, x: np.ndarray, n_views: int, device: torch.device) -> Inputs:
    """Uncached: every step runs the whole network, frozen prefix included."""
    xs = _to(device, x)
    k = bag_size(x)
    bag = xs.view(len(x), k, 3, *x.shape[2:]) if k > 1 else None

    def batch(idx: torch.Tensor, view: int, slices: torch.Tensor | None = None) -> torch.Tensor:
        rows = xs[idx] if bag is None else bag[idx, 0 if slices is None else slices]
        return dihedral(rows, view).to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)

    return Inputs(len(x), n_views, batch, model, k)


def cached_inputs(model: EfficientNetLite0, features: np.ndarray, start: int, device: torch.device,
                  n_slices: int = 1) -> Inputs:
    """Cached: `features` (N, views, C, h, w) are the frozen prefix's outputs; only the suffix runs.

    With a slice bag of `n_slices` k the view axis holds k x views entries, slice-major
    (`fedrad.client.features.compute_prefix`). On a GPU the whole cache goes to device memory
    once (it is small: a few MB per hundred images), so a step is pure GPU work with no host copy.
    """
    fs = torch.from_numpy(features).to(device)
    views = max(1, (features.shape[1] if features.ndim == 5 else 1) // n_slices)

    def batch(idx: torch.Tensor, view: int, slices: torch.Tensor | None = None) -> torch.Tensor:
        at = view if slices is None else slices.to(device) * views + view
        return fs[idx.to(device), at].contiguous(memory_format=torch.channels_last)

    return Inputs(len(features), views, batch, lambda h: model.forward_from(h, start), n_slices)


def fit(model: EfficientNetLite0, inputs: Inputs, y: np.ndarray, cfg: RunConfig, *, seed: int,
        device: torch.device = torch.device("cpu"), logit_offset: np.ndarray | None = None) -> dict[str, float]:
    """Train the unfrozen part for `cfg.local_epochs` epochs; return mean loss and timing.

    Frozen units stay in eval mode (their BN keeps its statistics); trainable units' BN
    layers are re-estimated on this site's training images after the last epoch
    (`recalibrate_bn`), so evaluation normalises with this site's statistics (FedBN).
    Each batch gets one random dihedral view (augmentation), drawn from `seed`; dropout
    draws from torch's global generator, seeded from `seed` too (inside `fork_rng`, so the
    caller's random state is untouched): the same seed gives the same model.
    `logit_offset` (K,), when given, is added to the logits inside the loss only: the
    logit-adjusted loss (`fedrad.common.labelshift.logit_adjustment`).
    """
    n = len(y)
    if n < 2:
        raise ValueError(f"A site needs at least 2 labelled training images to train; got {n}.")
    ys = torch.from_numpy(y).long().to(device)
    offset = torch.zeros(()) if logit_offset is None else torch.as_tensor(logit_offset, dtype=torch.float32)
    offset = offset.to(device)
    return train_epochs(model, inputs, n, cfg, seed=seed, device=device,
                        loss=lambda logits, idx: F.cross_entropy(logits + offset, ys[idx]))


def train_epochs(model: EfficientNetLite0, inputs: Inputs, n: int, cfg: RunConfig, *, seed: int,
                 device: torch.device, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 usable: Callable[[torch.Tensor], bool] | None = None) -> dict[str, float]:
    """The local epochs every task shares; `loss(logits, idx)` is the task's (classification, Cox).

    Seeded order and dihedral views, discriminative rates, BN of the adapted layers
    re-estimated on all `n` training images afterwards. A batch of one image, or one
    `usable(idx)` rejects (a Cox batch without an event), is skipped before its forward pass,
    after its view is drawn, so every task follows the same random sequence.

    A slice bag (`inputs.n_slices` k > 1): each epoch draws one of its k slices per patient
    (an augmentation: one row per patient per batch, so the Cox risk set is unchanged), from
    a generator of its own, so the order and views are those of k = 1; BN is re-estimated
    on all k slices of every patient (what evaluation, which averages the k, sees).
    """
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        bag = torch.Generator().manual_seed(seed + 7_919) if inputs.n_slices > 1 else None
        optimizer = make_optimizer(model, param_groups(model, lr_max=cfg.lr_max, lr_decay=cfg.lr_decay,
                                                       covariate_lr=cfg.covariate_lr), cfg.weight_decay)
        set_train_mode(model, cfg.freeze_blocks)
        losses: list[torch.Tensor] = []  # kept on the device: no GPU sync per step
        start = time.perf_counter()
        for _ in range(cfg.local_epochs):
            order = torch.randperm(n, generator=generator)
            picks = None if bag is None else torch.randint(0, inputs.n_slices, (n,), generator=bag)
            for i in range(0, n, cfg.batch_size):
                idx = order[i:i + cfg.batch_size]
                view = int(torch.randint(0, 8, (1,), generator=generator)) % inputs.n_views
                on = idx.to(device)
                if len(idx) < 2 or (usable is not None and not usable(on)):  # BatchNorm needs two images
                    continue
                with autocast(device):
                    logits = inputs.forward(inputs.batch(idx, view) if picks is None
                                            else inputs.batch(idx, view, picks[idx])).float()
                step_loss = loss(logits, on)  # in fp32 (cross-entropy) or fp64 (Cox), outside autocast
                optimizer.zero_grad(set_to_none=True)
                step_loss.backward()
                optimizer.step()
                losses.append(step_loss.detach())
        # every training image, in batches of at least batch-size (>= 2) images: the statistics are exact over
        # all n, which is the count the site reports with them (`bn-samples`)
        splits = torch.tensor_split(torch.arange(n), max(1, n // cfg.batch_size))
        with autocast(device):
            recalibrate_bn(model, (inputs.batch(idx, 0) if inputs.n_slices == 1
                                   else inputs.batch(idx, 0, torch.full_like(idx, j))
                                   for j in range(inputs.n_slices) for idx in splits),
                           forward=inputs.forward)
    mean_loss = float(torch.stack(losses).mean()) if losses else math.nan
    return {"train-loss": mean_loss, "seconds": time.perf_counter() - start}


@torch.no_grad()
def predict_proba(model: EfficientNetLite0, inputs: Inputs, batch_size: int = 64,
                  device: torch.device = torch.device("cpu")) -> np.ndarray:
    """P(malignant | image) for each image (view 0), in eval mode; a slice bag's logits are averaged first."""
    model.eval()
    out = []
    for i in range(0, inputs.n, batch_size):
        idx = torch.arange(i, min(i + batch_size, inputs.n))
        with autocast(device):
            logits = bag_mean(inputs, idx, lambda x: inputs.forward(x).float())
        out.append(F.softmax(logits, dim=1)[:, 1].cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)


def bag_mean(inputs: Inputs, idx: torch.Tensor, run: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """`run` on rows `idx` (view 0), averaged over a slice bag's k slices (test-time averaging).

    Why the mean of the outputs (a patient's risk = mean of its k slices' log hazards): each
    slice is a view of the same lesion, and averaging k noisy scores shrinks what one cut
    gets wrong. k = 1 is `run` on the rows as they are.
    """
    if inputs.n_slices == 1:
        return run(inputs.batch(idx, 0))
    total = None
    for j in range(inputs.n_slices):
        out = run(inputs.batch(idx, 0, torch.full_like(idx, j)))
        total = out if total is None else total + out
    return total / inputs.n_slices
