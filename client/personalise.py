"""Concept shift: a site-only copy of the decision layer, fine-tuned on the site's own labels.

When a site labels differently (P(Y|X) differs: a stricter reading protocol), no prior
correction helps: only the site's labels show the new concept. After federation a site
may therefore fine-tune its own copy of the classifier (the last linear layer) on the
penultimate features of its labelled images for a few epochs. Nothing of it is sent.

How far the personalised head's decisions move away from the (label-shift corrected)
global model's on the site's unlabelled images measures concept shift: under pure label
shift both should agree, since the prior correction already moved the global threshold.
Plain PyTorch on feature arrays, no Flower.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F


def personalise_head(features: np.ndarray, y: np.ndarray, weight: np.ndarray, bias: np.ndarray, *, epochs: int,
                     lr: float, seed: int, batch_size: int = 32, weight_decay: float = 1e-4
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Fine-tune a copy of the linear head (weight (K, D), bias (K,)) on (features (N, D), y (N,)).

    Plain cross-entropy: the personalised head learns the site's own prior along with its
    concept. AdamW, seeded shuffling; returns the new (weight, bias).

    Raises:
        ValueError: Shapes that do not match, or fewer than two classes among `y`.
    """
    x = torch.as_tensor(np.asarray(features, dtype=np.float32))
    labels = torch.as_tensor(np.asarray(y, dtype=np.int64))
    if x.ndim != 2 or x.shape[1] != weight.shape[1] or labels.shape != (len(x),) or bias.shape != (weight.shape[0],):
        raise ValueError(f"features {tuple(x.shape)}, labels {tuple(labels.shape)} and head {weight.shape}/"
                         f"{bias.shape} do not fit together.")
    if labels.unique().numel() < 2:
        raise ValueError(f"personalising a decision layer needs labelled images of both classes; got only "
                         f"{labels.unique().tolist()}.")
    head = torch.nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        head.weight.copy_(torch.as_tensor(weight, dtype=torch.float32))
        head.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            loss = F.cross_entropy(head(x[idx]), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return head.weight.detach().numpy().copy(), head.bias.detach().numpy().copy()


def head_probs(features: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Posteriors (N, K) of a linear head on penultimate features (N, D)."""
    logits = np.asarray(features, dtype=np.float64) @ np.asarray(weight, dtype=np.float64).T + bias
    logits -= logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)


def disagreement(probs_a: np.ndarray, probs_b: np.ndarray) -> float:
    """Fraction of images whose decision (arg-max class) differs between two sets of posteriors; NaN if none."""
    if len(probs_a) == 0:
        return float("nan")
    return float(np.mean(np.argmax(probs_a, axis=1) != np.argmax(probs_b, axis=1)))
