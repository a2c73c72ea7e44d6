"""Concept shift: a site-only copy of the decision layer, fine-tuned on the site's own labels.

When a site labels differently (P(Y|X) differs: a stricter reading protocol), no prior
correction helps: only the site's labels show the new concept. After federation a site
may therefore fine-tune its own copy of the classifier (the last linear layer) on the
penultimate features of its labelled images. Nothing of it is sent.

The fine-tuning is a MAP fit: cross-entropy plus a pull λ/2·||W − W_global||² toward the
global weights (the bias is free, so the site's own prior and threshold cost nothing),
solved full-batch by L-BFGS for a few steps. Small stochastic steps would do too, but a
1280-wide head moved by Adam on a hundred images wanders in every direction the data do
not pin down, and its decisions then differ from the global model's even where the
site's labels agree with it; the anchored fit moves only where the labels insist, which
is what makes disagreement a measure of concept shift.

How far the personalised head's decisions move away from the (label-shift corrected)
global model's on the site's unlabelled images measures concept shift: under pure label
shift both should agree, since the prior correction already moved the global threshold.
Plain PyTorch on feature arrays, no Flower.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F


def personalise_head(features: np.ndarray, y: np.ndarray, weight: np.ndarray, bias: np.ndarray, *, steps: int,
                     l2: float) -> tuple[np.ndarray, np.ndarray]:
    """Fine-tune a copy of the linear head (weight (K, D), bias (K,)) on (features (N, D), y (N,)).

    Minimises mean cross-entropy + l2/2 · ||weight − weight_global||² with at most `steps`
    L-BFGS iterations (deterministic). Plain cross-entropy: the personalised head learns the
    site's own prior along with its concept. Returns the new (weight, bias).

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
    anchor = torch.as_tensor(np.asarray(weight, dtype=np.float32))
    w = anchor.clone().requires_grad_(True)
    b = torch.as_tensor(np.asarray(bias, dtype=np.float32)).clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max(1, steps), line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ w.T + b, labels) + 0.5 * l2 * ((w - anchor) ** 2).sum()
        loss.backward()
        return loss

    if steps > 0:
        optimizer.step(closure)
    return w.detach().double().numpy(), b.detach().double().numpy()


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
