"""Image transforms that turn a :class:`DicomImage` into a CNN input.

MONAI style: one small class per transform, parameters validated in
``__init__``, ``__call__`` pure (never mutates its input, same output for the
same input). :class:`Preprocessor` composes them:

    ResampleCrop -> WindowChannels (CT) | RobustScaleChannels (others)
                 -> NormalizeForBackbone

:class:`Stack` runs several of them on one decoded image (one pass over a site's files
for two purposes).

Geometry convention (used by every site, so that a lesion of a given size in
mm covers the same number of network pixels everywhere): pixel (r, c) of an
image with spacing (sr, sc) mm covers [r*sr, (r+1)*sr) x [c*sc, (c+1)*sc) mm,
so its centre is at ((r + 0.5)*sr, (c + 0.5)*sc) mm.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from scipy import ndimage

from fedrad.common.dicom import DicomImage

CT_WINDOWS: tuple[tuple[float, float], ...] = ((-600.0, 1500.0), (40.0, 400.0), (-300.0, 2000.0))
"""(level, width) in HU: lung, soft tissue, wide."""
PLANE_WINDOW: tuple[float, float] = CT_WINDOWS[1]
"""(level, width) in HU of a CT plane when the channels are planes (slice modes 2.5d, orthogonal)."""
SLICE_MODES = ("largest", "2.5d", "orthogonal")
TARGETS = ("label", "survival")  # what a labels.csv row is scored on: its label, or its time + event
"""Run config `slice-mode`: how a series row becomes planes (`fedrad.client.slices`)."""

_ANTIALIAS_RATIO = 1.5  # blur only when output spacing > 1.5x input spacing


def _positive(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return value


def _subsample(values: np.ndarray, max_pixels: int = 1_000_000) -> np.ndarray:
    """Regular strided view with <= ~max_pixels pixels (percentiles of a 9 Mpx
    radiograph cost ~0.2 s; a 1 Mpx grid estimates them to well under 1 %)."""
    step = max(1, math.ceil(math.sqrt(values.size / max_pixels)))
    return values[::step, ::step]


class ResampleCrop:
    """Sample a fixed physical field of view around the lesion on a fixed grid.

    WHY: sites scan at 0.3-1.0 mm pixels; resampling every image to one
    spacing (mm/px) makes a 10 mm nodule 20 px wide at every site, which a CNN
    needs to share features across sites. Resampling and cropping are one
    interpolation step (``scipy.ndimage.map_coordinates``): each output pixel's
    physical offset (mm) from the lesion centre is mapped to input pixel
    coordinates with the image's own (row, col) spacing, so anisotropic pixels
    are handled and no intermediate grid loses resolution.

    Anti-aliasing: when the input is much finer than the output (ratio
    output/input spacing > 1.5 along an axis), that axis is first blurred with
    a Gaussian of sigma = 0.5 * (ratio - 1) input pixels (the same rule as
    ``skimage.transform.rescale``). Only the region that feeds the crop is
    blurred, so large radiographs stay cheap.

    Samples whose physical position falls outside the image (outside
    [0, rows*sr) x [0, cols*sc) mm) get the image minimum: air for CT, the
    darkest value otherwise.

    Attributes:
        spacing_mm: Output pixel spacing in mm (both axes).
        fov_mm: Output field of view in mm (both axes).
        order: Spline order of the interpolation (0 nearest, 1 linear, 3 cubic).
        size: Output side in pixels, ``round(fov_mm / spacing_mm)``.
    """

    def __init__(self, *, spacing_mm: float = 0.5, fov_mm: float = 48.0, order: int = 1) -> None:
        self.spacing_mm = _positive("spacing_mm", spacing_mm)
        self.fov_mm = _positive("fov_mm", fov_mm)
        if order not in (0, 1, 3):
            raise ValueError(f"order must be 0 (nearest), 1 (linear) or 3 (cubic), got {order!r}")
        self.order = order
        self.size = round(self.fov_mm / self.spacing_mm)
        if self.size < 1:
            raise ValueError(
                f"fov_mm ({fov_mm}) must be at least spacing_mm ({spacing_mm}) so the crop has >= 1 px"
            )

    def __repr__(self) -> str:
        return f"ResampleCrop(spacing_mm={self.spacing_mm}, fov_mm={self.fov_mm}, order={self.order})"

    def __call__(self, image: DicomImage, center_rc: tuple[float, float] | None = None) -> np.ndarray:
        """Resample and crop.

        Args:
            image: Source image; ``values`` in its own units (HU for CT).
            center_rc: Lesion centre (row, col) in input pixel indices (float
                allowed; (r, c) is the centre of pixel (r, c)). None = image
                centre, i.e. ((rows - 1)/2, (cols - 1)/2).

        Returns:
            float32 (size, size) in the image's own units.
        """
        values = np.asarray(image.values)
        if values.ndim != 2 or values.size == 0:
            raise ValueError(f"image.values must be a non-empty 2-D array, got shape {values.shape}")
        rows, cols = values.shape
        if center_rc is None:
            center_rc = ((rows - 1) / 2.0, (cols - 1) / 2.0)
        if len(center_rc) != 2 or not all(math.isfinite(float(v)) for v in center_rc):
            raise ValueError(f"center_rc must be two finite pixel coordinates, got {center_rc!r}")
        # Output pixel i sits at (i + 0.5 - size/2) * spacing mm from the centre;
        # input pixel coordinate of a physical position p (mm) is p/s - 0.5.
        offsets = (np.arange(self.size) + 0.5 - self.size / 2.0) * self.spacing_mm
        axes = []
        for centre_px, in_sp in zip(center_rc, image.spacing_mm):
            centre_mm = (float(centre_px) + 0.5) * in_sp
            axes.append((centre_mm + offsets) / in_sp - 0.5)
        fill = float(values.min())
        out = np.full((self.size, self.size), fill, dtype=np.float64)
        inside = [(a >= -0.5) & (a < n - 0.5) for a, n in zip(axes, (rows, cols))]
        if not (inside[0].any() and inside[1].any()):
            return out.astype(np.float32)
        sigmas = [
            0.5 * (self.spacing_mm / sp - 1.0) if self.spacing_mm / sp > _ANTIALIAS_RATIO else 0.0
            for sp in image.spacing_mm
        ]
        # Work on the sub-image that feeds the crop (plus a margin for the blur
        # and the interpolation kernel) instead of the whole image.
        bounds = []
        for a, n, sigma in zip(axes, (rows, cols), sigmas):
            margin = int(math.ceil(4.0 * sigma)) + 2
            lo = max(int(math.floor(a.min())) - margin, 0)
            hi = min(int(math.ceil(a.max())) + margin + 1, n)
            bounds.append((lo, hi))
        (r0, r1), (c0, c1) = bounds
        patch = values[r0:r1, c0:c1].astype(np.float64)  # a copy: input never mutated
        if any(s > 0 for s in sigmas):
            patch = ndimage.gaussian_filter(patch, sigma=sigmas, mode="nearest")
        rr, cc = np.meshgrid(axes[0] - r0, axes[1] - c0, indexing="ij")
        sampled = ndimage.map_coordinates(patch, [rr, cc], order=self.order, mode="nearest")
        mask = inside[0][:, None] & inside[1][None, :]
        out[mask] = sampled[mask]
        return out.astype(np.float32)


class WindowChannels:
    """CT: one channel per (level, width) window in HU, each mapped to [0, 1].

    WHY: HU are absolute, so fixed windows are comparable across sites; several
    windows give the 3-channel ImageNet backbone lung, soft-tissue and bone
    contrast at once instead of one compressed 4000 HU range.

    Attributes:
        windows: ((level, width), ...) in HU; width > 0.
    """

    def __init__(self, windows: Sequence[tuple[float, float]] = CT_WINDOWS) -> None:
        parsed = []
        for window in windows:
            if len(window) != 2:
                raise ValueError(f"each window must be (level, width) in HU, got {window!r}")
            level = float(window[0])
            if not math.isfinite(level):
                raise ValueError(f"window level must be finite HU, got {window[0]!r}")
            parsed.append((level, _positive("window width (HU)", window[1])))
        if not parsed:
            raise ValueError("windows must contain at least one (level, width) pair")
        self.windows: tuple[tuple[float, float], ...] = tuple(parsed)

    def __repr__(self) -> str:
        return f"WindowChannels(windows={self.windows})"

    def __call__(self, hu: np.ndarray) -> np.ndarray:
        """Map HU (H, W) to float32 (len(windows), H, W) in [0, 1]."""
        hu = np.asarray(hu, dtype=np.float64)
        channels = [np.clip((hu - (level - width / 2.0)) / width, 0.0, 1.0) for level, width in self.windows]
        return np.stack(channels).astype(np.float32)


class RobustScaleChannels:
    """Non-CT: per-image percentile scaling to [0, 1], replicated to channels.

    WHY: MR and X-ray values have no absolute unit (they depend on scanner,
    protocol and detector), so each image is scaled by its own low/high
    percentiles, which ignores a few hot or dead pixels. A constant image
    (high == low) maps to zeros rather than dividing by zero.

    Attributes:
        low_pct: Lower percentile (default 1st), mapped to 0.
        high_pct: Upper percentile (default 99th), mapped to 1.
        channels: Number of identical output channels (3 for the backbone).
    """

    def __init__(self, *, low_pct: float = 1.0, high_pct: float = 99.0, channels: int = 3) -> None:
        if not (0.0 <= low_pct < high_pct <= 100.0):
            raise ValueError(f"need 0 <= low_pct < high_pct <= 100, got {low_pct}, {high_pct}")
        if int(channels) != channels or channels < 1:
            raise ValueError(f"channels must be a positive integer, got {channels!r}")
        self.low_pct, self.high_pct, self.channels = float(low_pct), float(high_pct), int(channels)

    def __repr__(self) -> str:
        return f"RobustScaleChannels(low_pct={self.low_pct}, high_pct={self.high_pct}, channels={self.channels})"

    def __call__(self, x: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
        """Scale x (H, W) to float32 (channels, H, W) in [0, 1].

        Args:
            x: Values to scale (modality units).
            reference: Values the percentiles are taken from; default ``x``.
                :class:`Preprocessor` passes the whole image so that the scale
                does not depend on what happens to lie in the crop.
        """
        x = np.asarray(x, dtype=np.float64)
        ref = x if reference is None else np.asarray(reference)  # no float64 copy of big X-rays
        low, high = (float(v) for v in np.percentile(ref, [self.low_pct, self.high_pct]))
        if not high - low > 1e-12 * max(1.0, abs(high)):
            scaled = np.zeros_like(x)
        else:
            scaled = np.clip((x - low) / (high - low), 0.0, 1.0)
        return np.repeat(scaled[None].astype(np.float32), self.channels, axis=0)


class NormalizeForBackbone:
    """Map [0, 1] to EfficientNet-Lite0's TF input scaling: (x*255 - 127) / 128.

    WHY: the pretrained backbone was trained on inputs in about [-1, 1]
    computed exactly this way; any other scaling shifts its BatchNorm
    statistics and wastes the transfer.
    """

    def __repr__(self) -> str:
        return "NormalizeForBackbone()"

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Return float32 of the same shape, in [-127/128, 1]."""
        return ((np.asarray(x, dtype=np.float32) * 255.0 - 127.0) / 128.0).astype(np.float32)


class Preprocessor:
    """DicomImage -> (3, size, size) float32 CNN input.

    Resample/crop around the lesion, then CT windows (modality "CT") or robust
    percentile scaling (any other modality; percentiles of the whole image,
    on a regular <= 1 Mpx subsample for large radiographs), then the
    backbone's input scaling. An optional ``intensity_map`` (HU -> HU, e.g. the
    site's federated histogram matching, `fedrad.common.harmonize.IntensityMatch`) is
    applied to CT crops between resampling and windowing; its repr is part of
    this preprocessor's repr, which keys every cache of CNN inputs.

    Attributes:
        size: Output side in pixels.
        resample: The :class:`ResampleCrop` step.
        window: The :class:`WindowChannels` step (CT).
        robust: The :class:`RobustScaleChannels` step (non-CT).
        normalize: The :class:`NormalizeForBackbone` step.
    """

    def __init__(
        self,
        *,
        spacing_mm: float = 0.5,
        fov_mm: float = 48.0,
        ct_windows: Sequence[tuple[float, float]] = CT_WINDOWS,
        intensity_map: Callable[[np.ndarray], np.ndarray] | None = None,
        slice_mode: str = "largest",
        slab_mm: float = 5.0,
        target: str = "label",
        slices_per_lesion: int = 1,
    ) -> None:
        if slice_mode not in SLICE_MODES:
            raise ValueError(f"slice_mode must be one of {SLICE_MODES}, got {slice_mode!r}")
        if int(slices_per_lesion) < 1 or (slices_per_lesion > 1 and slice_mode != "largest"):
            raise ValueError(f"slices_per_lesion must be >= 1 (> 1 only with slice_mode 'largest'), "
                             f"got {slices_per_lesion!r} with {slice_mode!r}")
        self.slices_per_lesion = int(slices_per_lesion)
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        self.slice_mode = slice_mode
        self.target = target  # which labels.csv columns a row is scored on (`fedrad.client.dataset.load_site`)
        self.slab_mm = _positive("slab_mm", slab_mm)
        if len(ct_windows) != 3:
            raise ValueError(
                f"ct_windows must hold exactly 3 (level, width) pairs (one per backbone input "
                f"channel), got {len(ct_windows)}"
            )
        self.resample = ResampleCrop(spacing_mm=spacing_mm, fov_mm=fov_mm, order=1)
        self.window = WindowChannels(ct_windows)
        self.robust = RobustScaleChannels(channels=3)
        self.normalize = NormalizeForBackbone()
        self.size = self.resample.size
        self.intensity_map = intensity_map

    def __repr__(self) -> str:
        mapped = "" if self.intensity_map is None else f", {self.intensity_map!r}"
        planes = "" if self.slice_mode == "largest" else f", slice_mode={self.slice_mode!r}, slab_mm={self.slab_mm}"
        target = "" if self.target == "label" else f", target={self.target!r}"
        bag = "" if self.slices_per_lesion == 1 else f", slices_per_lesion={self.slices_per_lesion}"
        return (f"Preprocessor({self.resample!r}{mapped}, {self.window!r}, {self.robust!r}, "
                f"{self.normalize!r}{planes}{target}{bag})")

    def __call__(self, image: DicomImage, center_rc: tuple[float, float] | None = None) -> np.ndarray:
        """Return float32 (3, size, size) ready for the CNN.

        Args:
            image: Source image (HU for CT).
            center_rc: Lesion centre (row, col) in input pixels; None = image centre.
        """
        crop = self.resample(image, center_rc)
        if image.modality.strip().upper() == "CT":
            return self.from_hu(crop)
        return self.normalize(self.robust(crop, reference=_subsample(image.values)))

    def from_bag(self, images: Sequence[DicomImage], centres_rc: Sequence[tuple[float, float] | None]) -> np.ndarray:
        """A slice bag (`slices-per-lesion` k): (3k, size, size), input j from ``images[j % len(images)]``.

        Each slice is cropped and windowed exactly as one image is (`__call__`); the k inputs are
        stacked along channels (3 per slice, largest first) so every array and cache of CNN inputs
        keeps one row per patient. A 2-D row (one image) repeats it k times; k = 1 is `__call__`.
        """
        n = len(images)
        if n == 0:
            raise ValueError("a slice bag needs at least one image")
        out = [self(images[j % n], centres_rc[j % n]) for j in range(self.slices_per_lesion)]
        return out[0] if len(out) == 1 else np.concatenate(out).astype(np.float32, copy=False)

    def from_hu(self, crop: np.ndarray) -> np.ndarray:
        """The CT part after resampling: (size, size) HU crop -> (3, size, size) CNN input.

        Lets a site that kept its HU crops make inputs under another intensity map without
        decoding its files again.
        """
        if self.intensity_map is not None:
            crop = self.intensity_map(crop)
        return self.normalize(self.window(crop))

    def from_planes(self, images: Sequence[DicomImage], centres_rc: Sequence[tuple[float, float]],
                    main: int) -> np.ndarray:
        """Several planes of one lesion (`fedrad.client.slices`, 2.5d/orthogonal): one plane per channel.

        Each plane is resampled and cropped like a 2-D image; a CT plane is then mapped by one
        window (`PLANE_WINDOW`, soft tissue: lesions are soft tissue), other modalities by their
        own percentiles. ``main`` is unused here (see ``HUCrop``).
        """
        channels = []
        for image, centre in zip(images, centres_rc):
            crop = self.resample(image, centre)
            if image.modality.strip().upper() == "CT":
                if self.intensity_map is not None:
                    crop = self.intensity_map(crop)
                channels.append(WindowChannels((PLANE_WINDOW,))(crop)[0])
            else:
                channels.append(self.robust(crop, reference=_subsample(image.values))[0])
        return self.normalize(np.stack(channels))


class Stack:
    """Several preprocessors applied to one decoded image, outputs stacked along channels.

    WHY: decoding a DICOM costs more than everything done to it afterwards. A site's first
    pass over its files (its HU histogram) and its CNN inputs start from the same decoded
    images; stacking lets one pass produce both, split again by channel afterwards.

    Attributes:
        parts: The preprocessors, in channel order; all of the same output size.
        size: Their common output side in pixels.
    """

    def __init__(self, *parts: Callable[..., np.ndarray]) -> None:
        if not parts:
            raise ValueError("Stack needs at least one preprocessor")
        sizes = {getattr(part, "size", None) for part in parts}
        if len(sizes) != 1 or None in sizes:
            raise ValueError(f"Stack's preprocessors must share one output size, got {sizes}")
        self.parts = parts
        self.size: int = sizes.pop()

    def __repr__(self) -> str:
        return f"Stack({', '.join(map(repr, self.parts))})"

    def __call__(self, image: DicomImage, center_rc: tuple[float, float] | None = None) -> np.ndarray:
        """Return float32 (sum of the parts' channels, size, size)."""
        return np.concatenate([part(image, center_rc) for part in self.parts]).astype(np.float32, copy=False)

    @property
    def slice_mode(self) -> str:
        """The parts' slice mode (they are made from one run config, so they agree)."""
        return getattr(self.parts[-1], "slice_mode", "largest")

    @property
    def slab_mm(self) -> float:
        return getattr(self.parts[-1], "slab_mm", 5.0)

    @property
    def slices_per_lesion(self) -> int:
        return max(getattr(part, "slices_per_lesion", 1) for part in self.parts)

    def from_bag(self, images: Sequence[DicomImage], centres_rc: Sequence[tuple[float, float] | None]) -> np.ndarray:
        """A slice bag through every part: a part without bags (`HUCrop`) takes the largest slice only."""
        parts = [part.from_bag(images, centres_rc) if hasattr(part, "from_bag") else part(images[0], centres_rc[0])
                 for part in self.parts]
        return np.concatenate(parts).astype(np.float32, copy=False)

    @property
    def target(self) -> str:
        return getattr(self.parts[-1], "target", "label")

    def from_planes(self, images: Sequence[DicomImage], centres_rc: Sequence[tuple[float, float]],
                    main: int) -> np.ndarray:
        """Several planes of one lesion through every part, stacked along channels."""
        return np.concatenate([part.from_planes(images, centres_rc, main)  # type: ignore[attr-defined]
                               for part in self.parts]).astype(np.float32, copy=False)
