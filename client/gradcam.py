"""Grad-CAM at the site (`fedrad predict --explain`): where the network looked, kept beside the predictions.

Captum's `LayerGradCam` (Selvaraju et al. 2017) on one layer of the site's own network: the
layer's activations weighted by the spatially averaged gradient of the malignant logit, ReLU,
then upsampled (bilinear) to the CNN input. At 96 px every layer after block 11 is a 3 × 3 map
(stride 32), block 11 is 6 × 6. The default, block 15 (the first block the default run
fine-tunes), localised the synthetic lesions best in the layer study (`fedrad/lab/gradcam_study.py`,
pointing game 0.61 / 0.77 at site-a / site-b vs 0.47 / 0.60 for block 11 and 0.37 / 0.31 for the
head conv; a randomised-weights model 0.08 / 0.12).

Per image: `<out>/gradcam/<stem>.png` (the CNN input's soft-tissue window with the map over it,
the probability in the title) and `<stem>.npy` (the raw map, input size, float32). Maps are
per image and never leave the site.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from captum.attr import LayerAttribution, LayerGradCam
from torch import nn

from fedrad.common.efficientnet_lite import EfficientNetLite0

LAYERS = ("block11", "block13", "block15", "block16", "head")
DEFAULT_LAYER = "block15"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def layer_of(model: EfficientNetLite0, name: str) -> nn.Module:
    """`blockK` = MBConv block K (1-16; output stride 16 up to block 11, 32 from 12), `head` = the head conv's BN."""
    if name == "head":
        return model._bn1
    if name.startswith("block") and name[5:].isdigit() and 1 <= int(name[5:]) <= len(model._blocks):
        return model._blocks[int(name[5:]) - 1]
    raise ValueError(f"unknown Grad-CAM layer {name!r}; one of {LAYERS} (or block1..block{len(model._blocks)}).")


def gradcam_maps(model: EfficientNetLite0, x: np.ndarray, *, layer: str = DEFAULT_LAYER, target: int = 1,
                 batch_size: int = 16) -> np.ndarray:
    """Grad-CAM maps (N, S, S) float32 ≥ 0 of CNN inputs `x` (N, 3, S, S) for class `target`."""
    model = model.eval()
    cam = LayerGradCam(model, layer_of(model, layer))
    size = tuple(x.shape[-2:])
    device = next(model.parameters()).device
    maps = []
    for i in range(0, len(x), batch_size):
        xb = torch.from_numpy(np.ascontiguousarray(x[i:i + batch_size], np.float32)).to(device).requires_grad_(True)
        attr = cam.attribute(xb, target=target, relu_attributions=True)
        maps.append(LayerAttribution.interpolate(attr, size, interpolate_mode="bilinear")[:, 0].detach().float().cpu())
    return torch.cat(maps).numpy() if maps else np.zeros((0, *size), np.float32)


def map_stem(image: str) -> str:
    """A file name for an image's map: its labels.csv path with separators flattened."""
    stem = image.rsplit(".", 1)[0] if image.lower().endswith((".dcm", ".dicom")) else image
    return _UNSAFE.sub("_", stem.replace("/", "__").replace("\\", "__")).strip("_") or "image"


def write_overlays(out: Path, images: list[str], x: np.ndarray, maps: np.ndarray, probabilities: np.ndarray,
                   *, layer: str) -> list[Path]:
    """One PNG overlay and one .npy map per image under `out/gradcam/`; returns the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = out / "gradcam"
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for image, xi, cam, p in zip(images, x, maps, probabilities):
        stem = map_stem(image)
        np.save(folder / f"{stem}.npy", cam.astype(np.float32))
        fig, ax = plt.subplots(figsize=(3, 3.2))
        ax.imshow(xi[1], cmap="gray")  # channel 1: the soft-tissue window
        ax.imshow(cam / cam.max() if cam.max() > 0 else cam, cmap="jet", alpha=0.4, vmin=0, vmax=1)
        ax.set_title(f"{image}\nP(malignant) {p:.3f} · Grad-CAM {layer}", fontsize=7)
        ax.axis("off")
        fig.tight_layout()
        path = folder / f"{stem}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    return written
