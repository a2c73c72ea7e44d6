"""`fedrad export`: the site's network as ONNX or TorchScript, beside its model card.

The graph maps the CNN input (N, 3, S, S) float32 to two outputs: `logits` (N, 2) of the
federation's decision layer and `features` (N, 1280), the penultimate features the site's
personalised decision layer reads (kept beside it as `personalised-head.npz`). Preprocessing
(DICOM → resampled crop → CT windows → backbone scaling) is not in the graph: the model card
describes it exactly and `fedrad predict --exported DIR` rebuilds it from the card.

ONNX goes through torch's exporter (`torch.onnx.export`) and runs with onnxruntime;
TorchScript is `torch.jit.trace`. Both are checked against the torch model on the export's
example batch before anything is written (max |Δ logit| ≤ 1e-4).
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from fedrad.client.model_card import CARD_FILE
from fedrad.client.site_model import HEAD_FILE, SiteModel
from fedrad.common.efficientnet_lite import EfficientNetLite0

Format = Literal["onnx", "torchscript"]
FILES = {"onnx": "model.onnx", "torchscript": "model.pt"}
TOLERANCE = 1e-4
BATCH = 64


class LogitsAndFeatures(nn.Module):
    """The whole network on pixels: (logits, pooled penultimate features)."""

    def __init__(self, model: EfficientNetLite0) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.pool(self.model.forward_units(x))
        return self.model._fc(features), features


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def export_model(site: SiteModel, out: Path, fmt: Format, example: np.ndarray) -> Path:
    """Write the graph of `site`'s network to `out` (and its personalised head); return the graph's path.

    `example` (N, 3, S, S) is the batch the export traces and checks against torch.
    """
    if fmt not in FILES:
        raise ValueError(f"format must be one of {sorted(FILES)}; got {fmt!r}.")
    out.mkdir(parents=True, exist_ok=True)
    wrapper = LogitsAndFeatures(site.model.cpu().eval()).eval()
    x = torch.from_numpy(np.ascontiguousarray(example, np.float32))
    path = out / FILES[fmt]
    with torch.no_grad(), warnings.catch_warnings():
        # the tracer records the depthwise/pointwise path choices (map-size tests) as constants: right for
        # this input size, and checked on numbers below; torch.jit's deprecation notes are not the user's concern
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        if fmt == "onnx":
            torch.onnx.export(wrapper, (x,), str(path), input_names=["image"], output_names=["logits", "features"],
                              dynamic_axes={"image": {0: "n"}, "logits": {0: "n"}, "features": {0: "n"}},
                              opset_version=18, dynamo=False)
        else:
            traced = torch.jit.trace(wrapper, x, check_trace=False)  # checked below, on numbers
            torch.jit.save(traced, str(path))
        expected = wrapper(x)[0].numpy()
    got = exported_outputs(path)(example)[0]
    gap = float(np.max(np.abs(got - expected))) if len(expected) else 0.0
    if not gap <= TOLERANCE:
        path.unlink(missing_ok=True)
        raise RuntimeError(f"the exported {fmt} model's logits differ from torch's by {gap:.2e} (> {TOLERANCE}); "
                           "nothing was written.")
    if site.posteriors.head is not None:
        weight, bias = site.posteriors.head
        np.savez(out / HEAD_FILE, weight=weight, bias=bias)
    return path


def exported_outputs(path: Path) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """x (N, 3, S, S) -> (logits, features) float64 from an exported graph (`.onnx` or `.pt`)."""
    path = Path(path)
    if path.suffix == ".onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

        def run(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return tuple(session.run(["logits", "features"], {"image": x}))  # type: ignore[return-value]
    elif path.suffix == ".pt":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation note
            module = torch.jit.load(str(path), map_location="cpu").eval()

        def run(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            with torch.no_grad():
                z, f = module(torch.from_numpy(x))
            return z.numpy(), f.numpy()
    else:
        raise ValueError(f"{path}: not an exported fedrad model (model.onnx or model.pt).")

    def outputs(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = np.ascontiguousarray(x, np.float32)
        if len(x) == 0:
            return np.zeros((0, 2)), np.zeros((0, 0))
        parts = [run(x[i:i + BATCH]) for i in range(0, len(x), BATCH)]
        return (np.concatenate([p[0] for p in parts]).astype(np.float64),
                np.concatenate([p[1] for p in parts]).astype(np.float64))

    return outputs


def find_exported(folder: Path) -> Path:
    """The graph inside an exported folder (model.onnx, else model.pt), with its model card beside it."""
    folder = Path(folder)
    if not (folder / CARD_FILE).is_file():
        raise FileNotFoundError(f"{folder / CARD_FILE} not found: give the folder `fedrad export` wrote.")
    for name in FILES.values():
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{folder} holds no model.onnx or model.pt (fedrad export --format onnx|torchscript).")
