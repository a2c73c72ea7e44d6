"""What the trainable part of a site's model is fed: cached frozen-prefix features or pixels.

`site_inputs` decides once per message: with `feature-cache` on and a frozen prefix
(freeze-blocks >= 0) the prefix outputs come from the site's `FeatureCache` (computed for
missing images only); otherwise the whole network runs on pixels. With
`prefix-bn = "site"` the frozen prefix's BN statistics are first re-estimated on the
site's own training and unlabelled images (AdaBN inside the frozen prefix, forward
passes only) and stored with the cached features, so the prefix stays fixed for the run.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedrad.client.cache import FeatureCache, cache_folder, cache_key, dihedral
from fedrad.client.dataset import SiteData
from fedrad.client.train import Inputs, bag_size, cached_inputs, pixel_inputs
from fedrad.common.bn import bn_modules, recalibrate_bn
from fedrad.common.config import RunConfig
from fedrad.common.efficientnet_lite import EfficientNetLite0, weights_path
from fedrad.common.finetune import first_trainable_unit
from fedrad.common.preprocess import CT_WINDOWS

PREFIX_BN_PREFIX = "prefix-bn/"


@dataclass
class SiteInputs:
    train: Inputs
    test: Inputs
    cache_hits: int = 0
    cache_misses: int = 0
    unlabelled: Inputs | None = None  # the site's unlabelled images (label-shift only; view 0)


def n_views(cfg: RunConfig) -> int:
    return 8 if cfg.augment == "dihedral" else 1


# Prefix batch on CPU: small batches keep a block's activations in cache (measured at 96 px,
# 1 and 2 threads: 16 images/batch 1.7-1.8x faster than 64; 8 and 32 slower). A GPU wants
# large batches.
CPU_PREFIX_BATCH = 16
GPU_PREFIX_BATCH = 256


@torch.no_grad()
def compute_prefix(model: EfficientNetLite0, x: np.ndarray, start: int, views: int, device: torch.device,
                   batch_size: int | None = None) -> np.ndarray:
    """Frozen-prefix outputs of images `x` under dihedral views 0..views-1: (N, views, C, h, w).

    A slice bag (x of 3k channels, `fedrad.client.train.bag_size`) gives (N, k x views, C, h, w),
    slice-major: entry j x views + v is slice j under view v (the same mechanism as the views:
    several cached inputs per patient, one row per patient).
    """
    batch_size = batch_size or (GPU_PREFIX_BATCH if device.type == "cuda" else CPU_PREFIX_BATCH)
    model.eval()
    k = bag_size(x)
    out = []
    for i in range(0, len(x), batch_size):
        xb = torch.from_numpy(x[i:i + batch_size]).to(device).contiguous(memory_format=torch.channels_last)
        slices = [xb] if k == 1 else [xb[:, 3 * j:3 * j + 3].contiguous(memory_format=torch.channels_last)
                                      for j in range(k)]
        out.append(torch.stack([model.forward_units(dihedral(xs, v), 0, start).float().cpu()
                                for xs in slices for v in range(views)], dim=1))
    return torch.cat(out).numpy()


def prefix_bn_layers(model: EfficientNetLite0, start: int) -> dict[str, torch.nn.Module]:
    """BN layers inside the frozen prefix (units 0..start-1), by qualified name."""
    prefix_params = {id(p) for unit in model.feature_units()[:start] for p in unit.parameters()}
    return {name: m for name, m in bn_modules(model).items()
            if any(id(p) in prefix_params for p in m.parameters())}


def adapt_prefix_bn(model: EfficientNetLite0, images: np.ndarray, start: int, batch_size: int) -> dict[str, np.ndarray]:
    """AdaBN in the frozen prefix: re-estimate its BN statistics on the site's images; return them."""
    layers = prefix_bn_layers(model, start)
    tensor = torch.from_numpy(images)
    batches = torch.tensor_split(tensor, max(1, int(np.ceil(len(images) / batch_size))))
    recalibrate_bn(model, batches, layers=layers.values(), forward=lambda b: model.forward_units(b, 0, start))
    return {f"{PREFIX_BN_PREFIX}{name}.{k}": v.numpy().copy()
            for name, m in layers.items() for k, v in m.state_dict().items()}


def load_prefix_bn(model: EfficientNetLite0, stats: dict[str, np.ndarray]) -> None:
    state = {k[len(PREFIX_BN_PREFIX):]: torch.from_numpy(v) for k, v in stats.items() if k.startswith(PREFIX_BN_PREFIX)}
    model.load_state_dict(state, strict=False)


def _prefix_key(cfg: RunConfig, views: int, adapt_on: tuple[str, ...], preprocessing: str = "", slices: int = 1) -> str:
    weights = weights_path()
    return cache_key(spacing_mm=cfg.spacing_mm, fov_mm=cfg.fov_mm, windows=CT_WINDOWS, weights=weights.name,
                     weights_bytes=weights.stat().st_size, freeze_blocks=cfg.freeze_blocks, views=views,
                     prefix_bn=cfg.prefix_bn,
                     adapt_on=hashlib.sha256("".join(adapt_on).encode()).hexdigest() if adapt_on else "",
                     **({"preprocessing": preprocessing} if preprocessing else {}),
                     **({"slices": slices} if slices > 1 else {}))  # a slice bag: k x views features per image


def site_inputs(model: EfficientNetLite0, cfg: RunConfig, data: SiteData, work_dir: Path,
                device: torch.device) -> SiteInputs:
    """Training and test inputs for this site's model, through the feature cache when it applies."""
    start = first_trainable_unit(cfg.freeze_blocks)
    views = n_views(cfg)
    adapt_images = (np.concatenate([data.x_train, data.x_unlabelled]) if cfg.prefix_bn == "site"
                    else np.zeros((0,), np.float32))
    adapt_on = tuple(data.keys_train + data.keys_unlabelled) if cfg.prefix_bn == "site" else ()
    if not cfg.feature_cache or start == 0:
        if cfg.prefix_bn == "site" and start > 0:
            adapt_prefix_bn(model, adapt_images, start, cfg.batch_size)
        return SiteInputs(pixel_inputs(model, data.x_train, views, device), pixel_inputs(model, data.x_test, 1, device),
                          unlabelled=pixel_inputs(model, data.x_unlabelled, 1, device) if cfg.label_shift else None)
    folder = cache_folder(work_dir)
    slices = bag_size(data.x_train) if len(data.x_train) else bag_size(data.x_test)
    train_cache = FeatureCache(folder, _prefix_key(cfg, views, adapt_on, data.preprocessing, slices),
                               memory_mb=cfg.cache_memory_mb)
    test_cache = FeatureCache(folder, _prefix_key(cfg, 1, adapt_on, data.preprocessing, slices),
                              memory_mb=cfg.cache_memory_mb)
    if cfg.prefix_bn == "site":
        stats = train_cache.extra()
        if stats:
            load_prefix_bn(model, stats)
        else:
            train_cache.set_extra(adapt_prefix_bn(model, adapt_images, start, cfg.batch_size))
    train = train_cache.get(data.keys_train, lambda idx: compute_prefix(model, data.x_train[idx], start, views, device))
    test = test_cache.get(data.keys_test, lambda idx: compute_prefix(model, data.x_test[idx], start, 1, device))
    unlabelled = None
    if cfg.label_shift:  # same cache as the test images: view 0 only
        unlabelled = cached_inputs(model, _shaped(test_cache.get(
            data.keys_unlabelled, lambda idx: compute_prefix(model, data.x_unlabelled[idx], start, 1, device)),
            data.x_unlabelled), start, device, bag_size(data.x_unlabelled))
    return SiteInputs(cached_inputs(model, _shaped(train, data.x_train), start, device, bag_size(data.x_train)),
                      cached_inputs(model, _shaped(test, data.x_test), start, device, bag_size(data.x_test)),
                      cache_hits=train_cache.hits + test_cache.hits,
                      cache_misses=train_cache.misses + test_cache.misses, unlabelled=unlabelled)


def _shaped(features: np.ndarray, x: np.ndarray) -> np.ndarray:
    """An empty split still needs a 5-d array so batching code stays uniform."""
    return features if features.ndim == 5 else np.zeros((0, 1, 1, 1, 1), np.float32)
