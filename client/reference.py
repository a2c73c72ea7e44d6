"""The site's side of the federated intensity reference. No Flower here.

Before round 1 a site describes its intensities to the coordinator by two aggregates only:
the histogram of the HU values inside its lesion fields of view (the same crops the CNN
sees, before windowing; fixed bins, counts only) and a summary of its pixel spacings.
During the run it receives the pooled reference histogram back and maps its own HU onto
it (`fedrad.common.harmonize.IntensityMatch`) before the CT windows.

The histogram is taken over the training and unlabelled images (not the test split, so
the map is fitted without looking at what is scored). It is computed from the site's
own files once per folder state and kept in the site's cache folder (`intensity-<key>.npz`,
16 kB, keyed by the crop settings and the folder's fingerprint) and per process: with
harmonisation on, every message needs the site's own histogram to fit its map, and in the
Deployment Engine every message is a fresh process that would otherwise decode every file
again. The same read also yields the site's raw CNN inputs (`raw_preprocessor`), kept in the
site's array store so the next query does not decode the files either.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedrad.client import site_store
from fedrad.client.dataset import SiteData, channels, load_site
from fedrad.client.loaded_sites import folder_fingerprint, kept_site, load_site_cached, remember_site
from fedrad.common.config import RunConfig
from fedrad.common.dicom import DicomImage
from fedrad.common.harmonize import HarmonizationWarning, IntensityMatch, intensity_histogram, validate_counts
from fedrad.common.preprocess import Preprocessor, Stack

log = logging.getLogger("fedrad.site")


class HUCrop(Preprocessor):
    """The resample/crop step alone: (1, size, size) float32 in HU for CT, NaN otherwise.

    Lets `load_site` (labels.csv, validation, skipped files) deliver exactly the HU crops
    that the CNN's preprocessing would window. Non-CT images have no HU: they come back
    as NaN and are not counted in a histogram.
    """

    def __repr__(self) -> str:
        return f"HUCrop({self.resample!r})" if self.target == "label" else f"HUCrop({self.resample!r}, {self.target!r})"

    def __call__(self, image: DicomImage, center_rc: tuple[float, float] | None = None) -> np.ndarray:
        crop = self.resample(image, center_rc)
        if image.modality.strip().upper() != "CT":
            crop = np.full_like(crop, np.nan)
        return crop[None]

    def from_planes(self, images, centres_rc, main: int) -> np.ndarray:
        """A series row's planes: the HU crop of the plane through the lesion centre."""
        return self(images[main], centres_rc[main])


@dataclass(frozen=True)
class SiteIntensity:
    """What a site reports for the reference (aggregates only) and keeps for its own map.

    Attributes:
        counts: int64 (N_BINS,) HU histogram of its training + unlabelled crops.
        n_images: Images counted in `counts`.
        n_constant: Crops left out because they were constant (blank images).
        spacing_mm: (median, 5th, 95th percentile) in mm over every image read (sqrt(row x col)); quantiles,
            not extremes, so no single image's value is sent.
        n_spacings: Images behind `spacing_mm` (what the small-count rule judges when only spacings are sent).
    """

    counts: np.ndarray
    n_images: int
    n_constant: int
    spacing_mm: tuple[float, float, float]
    n_spacings: int = 0

    def metrics(self) -> dict[str, float]:
        """The scalar part of the reply (`fedrad.common.records.REFERENCE_METRICS`)."""
        median, low, high = self.spacing_mm
        return {"n-images": self.n_images, "n-pixels": int(self.counts.sum()), "n-constant": self.n_constant,
                "spacing-median-mm": median, "spacing-p05-mm": low, "spacing-p95-mm": high}


_MEMO: dict[tuple, SiteIntensity] = {}
MAX_MEMO = 32  # a histogram is 16 kB: an actor serving several sites keeps all of theirs


def raw_preprocessor(cfg: RunConfig) -> Preprocessor:
    """The CNN preprocessing of this run without any intensity map (harmonize off)."""
    return Preprocessor(spacing_mm=cfg.spacing_mm, fov_mm=cfg.fov_mm, slice_mode=cfg.slice_mode, slab_mm=cfg.slab_mm,
                        target=target_of(cfg), slices_per_lesion=cfg.slices_per_lesion)


def target_of(cfg: RunConfig) -> str:
    """What the run's rows are scored on: time + event with `task = survival`, else the label."""
    return "survival" if cfg.task == "survival" else "label"


def site_intensity(site_dir: Path, cfg: RunConfig, *, site: str | None = None,
                   cache_dir: Path | None = None) -> SiteIntensity:
    """The site's histogram (at the run's spacing and field of view) and spacing summary.

    With `spacing-mm = 0` (the coordinator has not chosen the spacing yet) only the
    spacing summary is meaningful; the histogram is then empty. With `cache_dir` (the site's
    cache folder) the result is kept there, and a read of the files made for it also makes
    the raw CNN inputs and keeps them for `load_site_cached`: decoding, not histogramming,
    is what a pass costs.
    """
    site_dir = Path(site_dir)
    site = site or site_dir.resolve().name
    cropper = _cropper(cfg)
    fingerprint = folder_fingerprint(site_dir)
    key = (str(site_dir.resolve()), repr(cropper), fingerprint)
    if key not in _MEMO:
        path = None if cache_dir is None else site_store.keyed_path(cache_dir, "intensity", key)
        own = None if path is None else _load_intensity(path)
        if own is None:
            inputs = raw_preprocessor(cfg) if cache_dir is not None and cfg.spacing_mm > 0 else None
            own = _measure(site_dir, cropper, site, want_histogram=cfg.spacing_mm > 0, inputs=inputs,
                           inputs_cache=cache_dir, keep_crops=cfg.harmonize != "off", fingerprint=fingerprint)
            if path is not None:
                site_store.write_npz(path, {"counts": own.counts, "n_images": np.array(own.n_images),
                                            "n_constant": np.array(own.n_constant),
                                            "spacing_mm": np.array(own.spacing_mm),
                                            "n_spacings": np.array(own.n_spacings)}, keep=MAX_KEPT)
        while len(_MEMO) >= MAX_MEMO:
            _MEMO.pop(next(iter(_MEMO)))
        _MEMO[key] = own
    return _MEMO[key]


MAX_KEPT = 2  # intensity files per site folder state kept on disk: the spacing survey's and the run's


def _cropper(cfg: RunConfig) -> HUCrop:
    spacing = cfg.spacing_mm or cfg.fov_mm / 8.0  # a tiny crop when only spacings are wanted
    return HUCrop(spacing_mm=spacing, fov_mm=cfg.fov_mm, slice_mode=cfg.slice_mode, slab_mm=cfg.slab_mm,
                  target=target_of(cfg))


def _load_intensity(path: Path) -> SiteIntensity | None:
    """The summary kept at `path`, or None when there is none (or it is unreadable: measured again)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            spacing = tuple(float(v) for v in f["spacing_mm"])
            return SiteIntensity(f["counts"].astype(np.int64), int(f["n_images"]), int(f["n_constant"]),
                                 (spacing[0], spacing[1], spacing[2]), int(f["n_spacings"]))
    except (OSError, ValueError, KeyError, IndexError, EOFError, zipfile.BadZipFile) as err:
        log.warning("ignoring the unreadable intensity file %s (%s); reading the site folder again", path, err)
        return None


def _measure(site_dir: Path, cropper: HUCrop, site: str, *, want_histogram: bool,
             inputs: Preprocessor | None = None, inputs_cache: Path | None = None,
             keep_crops: bool = False, fingerprint: tuple) -> SiteIntensity:
    if inputs is None:
        data = load_site(site_dir, cropper)
    else:  # one read, two results: the HU crops (channel 0) and the CNN inputs (the rest)
        both = load_site(site_dir, Stack(cropper, inputs))
        data = channels(both, slice(0, 1), repr(cropper))
        remember_site(site_dir, channels(both, slice(1, None), repr(inputs)), fingerprint=fingerprint,
                      cache_dir=inputs_cache)
        if keep_crops:  # harmonised inputs are made from them once the reference is known (`load_inputs`)
            remember_site(site_dir, data, fingerprint=fingerprint, cache_dir=inputs_cache)
    spacings = np.sqrt(np.prod(data.spacings_mm, axis=1)) if len(data.spacings_mm) else np.array([np.nan])
    summary = (float(np.median(spacings)), float(np.quantile(spacings, 0.05)), float(np.quantile(spacings, 0.95)))
    counts = np.zeros_like(intensity_histogram(np.zeros(0)))
    crops = [c[0] for part in (data.x_train, data.x_unlabelled) for c in part] if want_histogram else []
    n_constant = n_images = 0
    for crop in crops:
        finite = crop[np.isfinite(crop)]
        if finite.size == 0:
            continue  # not CT: no HU to count
        if float(finite.max()) == float(finite.min()):
            n_constant += 1
            continue
        counts += intensity_histogram(finite)
        n_images += 1
    if n_constant:
        _warn(f"site {site}: {n_constant} of its crops are constant (blank images?); they are left out of its "
              "intensity histogram (they still train).")
    return SiteIntensity(counts, n_images, n_constant, summary, len(data.spacings_mm))


def _warn(message: str) -> None:
    """A site-side harmonisation problem: in the site's log and as a HarmonizationWarning."""
    log.warning("%s", message)
    warnings.warn(HarmonizationWarning(message), stacklevel=3)


def site_preprocessor(cfg: RunConfig, site_dir: Path, reference: np.ndarray | None, *,
                      site: str | None = None, cache_dir: Path | None = None) -> Preprocessor:
    """The CNN preprocessing of this run: with `harmonize` on, HU mapped onto `reference` first."""
    if cfg.harmonize == "off":
        return raw_preprocessor(cfg)
    site = site or Path(site_dir).resolve().name
    if reference is None:
        raise ValueError(f"site {site}: harmonize = '{cfg.harmonize}' but the coordinator sent no reference "
                         "histogram; coordinator and site must run the same fedrad version.")
    own = site_intensity(site_dir, cfg, site=site, cache_dir=cache_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", HarmonizationWarning)
        match = IntensityMatch.fit(own.counts, validate_counts(reference, what="the reference histogram"),
                                   method=cfg.harmonize, split_hu=cfg.harmonize_split_hu, site=site)
    for warning in caught:
        _warn(str(warning.message))
    return Preprocessor(spacing_mm=cfg.spacing_mm, fov_mm=cfg.fov_mm, intensity_map=match,
                        slice_mode=cfg.slice_mode, slab_mm=cfg.slab_mm, target=target_of(cfg),
                        slices_per_lesion=cfg.slices_per_lesion)


def load_inputs(cfg: RunConfig, site_dir: Path, reference: np.ndarray | None, *, site: str | None = None,
                cache_dir: Path | None = None) -> SiteData:
    """The site's CNN inputs for this run (`site_preprocessor`), through `load_site_cached`.

    With harmonisation on, and the HU crops and raw inputs of the histogram pass in the
    site's store, the harmonised inputs are made from them (`Preprocessor.from_hu`) instead
    of decoding every file again: equal to a fresh read, since the map and the windows act
    on the same resampled crop.
    """
    preprocessor = site_preprocessor(cfg, site_dir, reference, site=site, cache_dir=cache_dir)
    make = None
    if preprocessor.intensity_map is not None and preprocessor.slices_per_lesion == 1:  # kept crops: one slice each
        def make(fingerprint: tuple) -> SiteData | None:
            return _from_kept_crops(cfg, Path(site_dir), preprocessor, fingerprint, cache_dir)
    return load_site_cached(site_dir, preprocessor, cache_dir=cache_dir, make=make)


def _from_kept_crops(cfg: RunConfig, site_dir: Path, preprocessor: Preprocessor, fingerprint: tuple,
                     cache_dir: Path | None) -> SiteData | None:
    crops, raw = (kept_site(site_dir, repr(p), fingerprint, cache_dir) for p in (_cropper(cfg), raw_preprocessor(cfg)))
    if crops is None or raw is None or (crops.keys_train, crops.keys_test, crops.keys_unlabelled) != (
            raw.keys_train, raw.keys_test, raw.keys_unlabelled):
        return None

    def mapped(hu: np.ndarray, inputs: np.ndarray) -> np.ndarray:
        out = inputs.copy()
        for i, crop in enumerate(hu[:, 0]):
            if not np.isnan(crop).all():  # CT; HUCrop leaves other modalities NaN, and no map applies to them
                out[i] = preprocessor.from_hu(crop)
        return out

    return dataclasses.replace(raw, preprocessing=repr(preprocessor), **{
        name: mapped(getattr(crops, name), getattr(raw, name)) for name in ("x_train", "x_test", "x_unlabelled")})
