"""Differential privacy at the site: clip the round's update of the shared tensors, add Gaussian noise.

The update is what this round's training changed in the shared tensors (trained minus
received). Its L2 norm over all shared tensors together is clipped to `dp-clip`, and
Gaussian noise of standard deviation `dp-noise x dp-clip` is added to every value, before
the reply is built. The noise comes from the operating system's entropy, never from the
run's seed: a coordinator that knows the seed must not be able to subtract it. The cost
in epsilon is `fedrad.common.dp.epsilon`.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch


def clip_and_noise(trained: Mapping[str, torch.Tensor], received: Mapping[str, torch.Tensor], *, clip: float,
                   noise: float, rng: np.random.Generator | None = None) -> tuple[dict[str, torch.Tensor], float]:
    """(received + clipped update + noise per shared key, the update's norm before clipping)."""
    rng = rng if rng is not None else np.random.default_rng()  # OS entropy
    deltas = {k: trained[k].detach().cpu().double() - received[k].detach().cpu().double() for k in received}
    norm = float(torch.sqrt(sum((d * d).sum() for d in deltas.values())))
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    out = {}
    for key, delta in deltas.items():
        noisy = delta * scale + torch.from_numpy(rng.normal(0.0, noise * clip, size=tuple(delta.shape)))
        out[key] = (received[key].detach().cpu().double() + noisy).to(received[key].dtype)
    return out, norm
