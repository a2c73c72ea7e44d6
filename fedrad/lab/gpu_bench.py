"""`fedrad bench-gpu`: how close local training gets to the GPU's limit for the same work.

Three figures at one batch size and image size, bf16 autocast and channels-last on CUDA:
- `train_images_per_second`: fedrad's own `fit` on cached frozen-prefix features (the
  real local-training loop: optimizer, augmentation views, BN re-estimation included);
- `bare_fwd_bwd_images_per_second`: a bare forward+backward of the same trainable part on
  the same tensors already in GPU memory, no optimizer: the limit we compare against;
- `full_fwd_bwd_images_per_second` and `full_fwd_images_per_second`: the whole backbone
  (for scale: full fine-tuning and inference).
Runs on the CPU with `--device cpu` (slowly) so the script itself is tested here.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import numpy as np
import torch

from fedrad.client.features import compute_prefix
from fedrad.client.train import autocast, cached_inputs, fit, pick_device
from fedrad.common.config import RunConfig
from fedrad.common.finetune import first_trainable_unit
from fedrad.common.model import build_model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rate(step: Callable[[], None], batch: int, steps: int, device: torch.device) -> float:
    """Images/s of `step` over `steps` timed repetitions after 3 warm-ups."""
    for _ in range(3):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return batch * steps / (time.perf_counter() - start)


def measure(*, device: torch.device, image_size: int, batch_size: int, images: int, freeze_blocks: int,
            steps: int) -> dict[str, float | int | str]:
    torch.backends.cudnn.benchmark = device.type == "cuda"
    cfg = RunConfig(freeze_blocks=freeze_blocks, batch_size=batch_size, local_epochs=1, spacing_mm=0.5,
                    fov_mm=image_size * 0.5, augment="none")
    model = build_model(cfg, device)
    start = first_trainable_unit(cfg.freeze_blocks)
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(images, 3, image_size, image_size, generator=generator).numpy()
    features = compute_prefix(model, x, start, 1, device, batch_size=batch_size)
    y = (np.arange(images) % 2).astype(np.int64)
    inputs = cached_inputs(model, features, start, device)
    fit(model, inputs, y, cfg, seed=0, device=device)  # warm-up epoch
    _sync(device)
    seconds = fit(model, inputs, y, cfg, seed=1, device=device)["seconds"]
    train_rate = images / seconds

    h = torch.from_numpy(features[:batch_size, 0]).to(device)
    pixels = torch.from_numpy(x[:batch_size]).to(device).contiguous(memory_format=torch.channels_last)
    model.train()

    def suffix_step() -> None:
        with autocast(device):
            loss = model.forward_from(h, start).float().logsumexp(1).mean()
        loss.backward()

    full = build_model(cfg.replace(freeze_blocks=-1), device).train()

    def full_step() -> None:
        with autocast(device):
            loss = full(pixels).float().logsumexp(1).mean()
        loss.backward()

    @torch.no_grad()
    def full_forward() -> None:
        with autocast(device):
            full(pixels)

    bare = _rate(suffix_step, batch_size, steps, device)
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "image_size": image_size, "batch_size": batch_size, "images": images, "freeze_blocks": freeze_blocks,
        "train_images_per_second": round(train_rate, 1),
        "bare_fwd_bwd_images_per_second": round(bare, 1),
        "train_vs_bare": round(train_rate / bare, 3),
        "full_fwd_bwd_images_per_second": round(_rate(full_step, batch_size, steps, device), 1),
        "full_fwd_images_per_second": round(_rate(full_forward, batch_size, steps, device), 1),
        "torch": torch.__version__,
    }


def main(args: argparse.Namespace) -> int:
    device = pick_device(args.device)
    results = measure(device=device, image_size=args.image_size, batch_size=args.batch_size, images=args.images,
                      freeze_blocks=args.freeze_blocks, steps=args.steps)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_bench.json").write_text(json.dumps(results, indent=2))
    width = max(map(len, results))
    for key, value in results.items():
        print(f"{key:<{width}}  {value}")
    return 0
