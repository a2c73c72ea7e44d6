"""Synthetic CT *series* with 3-D lesions, masks in three formats, and survival (`fedrad synth --kind series`).

Each site gets one CT series per patient (`ct/<patient>/`, one DICOM file per slice), its
lesion mask (`masks/<patient>.*`) and a `labels.csv` row with `series`, `mask`, `roi_name`,
`label`, `split`, `time`, `event`; `truth.json` beside the sites holds the true risk model.

Why it looks the way it does:
    * Sites differ like scanners and PACS exports do: slice thickness (1.25, 2.5, 5 mm, so
      24-64 slices), pixel spacing, kernel blur, noise, HU offset; the mask format (one
      site DICOM SEG, one RT Structure Set with ROI "GTV", one NIfTI); one site's slices are
      JPEG 2000 compressed.
    * The lesion is a 3-D ellipsoid whose margin is lobulated and whose interior is
      heterogeneous (granular texture, dark necrosis-like blobs) in proportion to a latent
      malignancy score, as in the 2-D generator (`fedrad.lab.synth_lesion`): the class is
      visible shape and texture, not mean intensity (the tissue HU is drawn independently).
    * Survival depends only on what the image shows: log hazard ratio
      eta = b_vol * z(log volume) + b_irr * z(lobulation) + b_het * z(texture SD), each
      feature the *realised* one of the drawn lesion, standardised by fixed constants
      (`FEATURES`). Times are Weibull with proportional hazards, S(t | eta) =
      exp(-(t / scale)^shape * exp(eta)); censoring is site-specific (exponential drop-out
      plus the end of the site's follow-up). truth.json gives the coefficients and, per site,
      the C-index the true eta reaches on the test split and on all patients: the ceiling no
      model of the images can beat in expectation.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from fedrad.common.survival import pair_counts
from fedrad.lab.series_export import volume_affine, write_nifti, write_rtstruct, write_seg, write_series

TRUTH_FILE = "truth.json"
MASK_FORMATS = ("seg", "rtstruct", "nifti")
ROI_NAME = "GTV"  # the RT Structure Set's ROI
WEIBULL_SHAPE, WEIBULL_SCALE_DAYS = 1.5, 900.0
# feature -> (coefficient per standardised unit, centre, scale): z = (value - centre) / scale
FEATURES = {"log_volume_mm3": (0.8, 7.0, 0.7), "lobulation": (0.7, 0.12, 0.06), "texture_sd_hu": (0.5, 45.0, 18.0)}


@dataclass(frozen=True)
class SeriesSite:
    """One simulated hospital exporting series.

    Attributes:
        name: Folder name.
        n_patients: Patients (one series each).
        slice_mm: Slice thickness = spacing along z (1-5 mm).
        n_slices: Slices per series (24-64).
        pixel_mm: In-plane spacing (mm).
        size_px: Rows = columns per slice.
        noise_hu, blur_mm, hu_offset: Scanner: white noise SD, Gaussian kernel SD, calibration offset.
        mask_format: "seg", "rtstruct" or "nifti".
        compress: Write the slices JPEG 2000 (lossless) compressed.
        dropout_days: Mean of the exponential drop-out time (censoring).
        follow_up_days: End of follow-up: everyone still event-free then is censored.
        prevalence: Fraction malignant (exact count).
        test_fraction: Fraction of patients in the test split.
    """

    name: str
    n_patients: int
    slice_mm: float
    n_slices: int
    mask_format: str
    pixel_mm: float = 0.7
    size_px: int = 80
    noise_hu: float = 20.0
    blur_mm: float = 0.6
    hu_offset: float = 0.0
    compress: bool = False
    dropout_days: float = 3000.0
    follow_up_days: float = 2000.0
    prevalence: float = 0.5
    test_fraction: float = 0.4

    def __post_init__(self) -> None:
        checks = [(self.n_patients >= 1, "n_patients must be >= 1"),
                  (0 < self.slice_mm <= 10, "slice_mm must be in (0, 10]"),
                  (self.n_slices >= 4, "n_slices must be >= 4"),
                  (self.mask_format in MASK_FORMATS, f"mask_format must be one of {MASK_FORMATS}"),
                  (self.size_px >= 16 and self.pixel_mm > 0, "size_px must be >= 16 and pixel_mm > 0"),
                  (self.dropout_days > 0 and self.follow_up_days > 0, "dropout_days, follow_up_days must be > 0"),
                  (0 <= self.prevalence <= 1 and 0 < self.test_fraction < 1, "prevalence in [0, 1], "
                   "test_fraction in (0, 1)")]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"SeriesSite {self.name!r}: {message}; got {self!r}")


def default_series_sites(n_patients: int = 160) -> list[SeriesSite]:
    """Three sites, one per mask format and slice thickness; site-b JPEG 2000 compressed, heavier censoring at c."""
    return [
        SeriesSite("site-a", n_patients, 1.25, 48, "seg", pixel_mm=0.7, noise_hu=15.0, blur_mm=0.5,
                   dropout_days=4000.0, follow_up_days=2200.0),
        SeriesSite("site-b", n_patients, 2.5, 32, "rtstruct", pixel_mm=0.8, noise_hu=25.0, blur_mm=0.8,
                   hu_offset=30.0, compress=True, dropout_days=2500.0, follow_up_days=1800.0),
        SeriesSite("site-c", n_patients, 5.0, 24, "nifti", pixel_mm=0.75, noise_hu=20.0, blur_mm=0.6,
                   hu_offset=-20.0, dropout_days=1500.0, follow_up_days=1400.0),
    ]


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def draw_patient(rng: np.random.Generator, score: float, site: SeriesSite) -> tuple[np.ndarray, np.ndarray, dict]:
    """One patient's clean-then-scanned volume (HU, slices x rows x cols), lesion mask and realised features."""
    k, r, c = site.n_slices, site.size_px, site.size_px
    z = (np.arange(k) - (k - 1) / 2) * site.slice_mm
    y = (np.arange(r) - (r - 1) / 2) * site.pixel_mm
    x = (np.arange(c) - (c - 1) / 2) * site.pixel_mm
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
    radius = float(np.exp(rng.normal(math.log(7.0), 0.25)))  # mm; size is independent of the class
    axes = radius * rng.uniform(0.8, 1.25, 3)
    centre = rng.normal(0.0, 2.0, 3)
    u = np.stack([(zz - centre[0]) / axes[0], (yy - centre[1]) / axes[1], (xx - centre[2]) / axes[2]])
    rho = np.sqrt((u ** 2).sum(0)) + 1e-9
    lobulation = 0.24 * _sigmoid(1.5 * score + rng.normal(0, 0.7))  # margin irregularity grows with the score
    bumps = np.zeros_like(rho)
    for _ in range(4):
        v = rng.normal(size=3)
        v /= np.linalg.norm(v)
        bumps += np.cos(rng.integers(2, 4) * math.pi * np.tensordot(v, u / rho, axes=1) + rng.uniform(0, 2 * math.pi))
    mask = rho < 1.0 + lobulation * bumps / 2.0
    texture_sd = 10.0 + 70.0 * _sigmoid(1.5 * score + rng.normal(0, 0.7))  # heterogeneity grows with the score
    grain = ndimage.gaussian_filter(rng.normal(size=rho.shape), (0.8 / site.slice_mm, 0.8 / site.pixel_mm,
                                                                 0.8 / site.pixel_mm))
    grain *= texture_sd / max(float(grain[mask].std()) if mask.sum() > 1 else 1.0, 1e-6)
    tissue = rng.normal(30.0, 15.0) + grain
    for _ in range(rng.poisson(3.0 * _sigmoid(score))):  # necrosis-like dark blobs
        p = centre + rng.normal(0, 0.4, 3) * axes
        blob = ((zz - p[0]) ** 2 + (yy - p[1]) ** 2 + (xx - p[2]) ** 2) < (0.3 * radius) ** 2
        tissue = np.where(blob, tissue - 60.0, tissue)
    background = -780.0 + 60.0 * ndimage.gaussian_filter(rng.normal(size=rho.shape), 2.0) * 3.0
    hu = np.where(mask, tissue, background)
    sigma = (site.blur_mm / site.slice_mm, site.blur_mm / site.pixel_mm, site.blur_mm / site.pixel_mm)
    hu = ndimage.gaussian_filter(hu, sigma) + rng.normal(0.0, site.noise_hu, hu.shape) + site.hu_offset
    volume = float(mask.sum()) * site.slice_mm * site.pixel_mm ** 2
    features = {"log_volume_mm3": math.log(max(volume, 1.0)), "lobulation": lobulation, "texture_sd_hu": texture_sd}
    return hu.astype(np.float32), mask, features


def true_risk(features: dict[str, float]) -> float:
    """eta: the true log hazard ratio of a lesion's realised features (`FEATURES`)."""
    return sum(beta * (features[name] - centre) / scale for name, (beta, centre, scale) in FEATURES.items())


def draw_survival(rng: np.random.Generator, eta: float, site: SeriesSite) -> tuple[float, int]:
    """(days, event): Weibull PH event time against exponential drop-out and the end of follow-up."""
    t_event = WEIBULL_SCALE_DAYS * (-math.log(rng.uniform(1e-12, 1.0)) * math.exp(-eta)) ** (1.0 / WEIBULL_SHAPE)
    t_censor = min(rng.exponential(site.dropout_days), site.follow_up_days)
    return (round(max(t_event, 1.0), 1), 1) if t_event <= t_censor else (round(max(t_censor, 1.0), 1), 0)


def write_patient(folder: Path, pid: str, hu: np.ndarray, mask: np.ndarray, site: SeriesSite) -> tuple[str, str, str]:
    """The series and its mask in the site's format; returns the labels.csv cells (series, mask, roi_name)."""
    spacing = (site.slice_mm, site.pixel_mm, site.pixel_mm)
    origin = (-(site.size_px - 1) / 2 * site.pixel_mm,) * 2 + (-(site.n_slices - 1) / 2 * site.slice_mm,)
    slices = write_series(folder / "ct" / pid, hu, spacing, origin_mm=origin, patient_id=pid, compress=site.compress)
    (folder / "masks").mkdir(exist_ok=True)
    if site.mask_format == "seg":
        write_seg(folder / "masks" / f"{pid}.seg.dcm", slices, mask)
        return f"ct/{pid}", f"masks/{pid}.seg.dcm", ""
    if site.mask_format == "rtstruct":
        write_rtstruct(folder / "masks" / f"{pid}.rtstruct.dcm", slices, mask, roi_name=ROI_NAME)
        return f"ct/{pid}", f"masks/{pid}.rtstruct.dcm", ROI_NAME
    write_nifti(folder / "masks" / f"{pid}.nii.gz", mask, volume_affine(spacing, origin))
    return f"ct/{pid}", f"masks/{pid}.nii.gz", ""


def c_index(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float | None:
    """Harrell's C-index of `risk` (higher = earlier event), as the sites compute it; None without a comparable pair."""
    value = pair_counts(time, event, risk).c_index
    return value if math.isfinite(value) else None


def generate_series(out_dir: Path, *, sites: Sequence[SeriesSite] | None = None, seed: int = 0,
                    on_patient: Callable[[str, int], None] | None = None) -> list[Path]:
    """Write every site's series, masks and labels.csv, and `truth.json`; returns the site folders.

    Pixel data, masks, labels and truth depend only on (`seed`, site index, patient); DICOM UIDs are fresh.
    """
    sites = default_series_sites() if sites is None else list(sites)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    out_dir = Path(out_dir)
    folders, truth = [], []
    for index, site in enumerate(sites):
        folder = out_dir / site.name
        folder.mkdir(parents=True, exist_ok=True)
        streams = np.random.SeedSequence([seed, 7919, index]).spawn(site.n_patients + 1)
        top = np.random.default_rng(streams[0])
        label = np.zeros(site.n_patients, dtype=int)
        label[top.permutation(site.n_patients)[:round(site.prevalence * site.n_patients)]] = 1
        score = top.normal(np.where(label == 1, 1.0, -1.0), 0.8)
        is_test = np.zeros(site.n_patients, dtype=bool)
        is_test[top.permutation(site.n_patients)[:max(1, round(site.test_fraction * site.n_patients))]] = True
        rows, etas, times, events = [], [], [], []
        for i in range(site.n_patients):
            rng = np.random.default_rng(streams[i + 1])
            pid = f"{site.name}-{i + 1:04d}"
            hu, mask, features = draw_patient(rng, float(score[i]), site)
            eta = true_risk(features)
            days, event = draw_survival(rng, eta, site)
            cells = write_patient(folder, pid, hu, mask, site)
            rows.append([*cells, str(label[i]), "test" if is_test[i] else "train", f"{days:.1f}", str(event)])
            etas.append(eta)
            times.append(days)
            events.append(event)
            if on_patient is not None:
                on_patient(site.name, i + 1)
        with open(folder / "labels.csv", "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(["series", "mask", "roi_name", "label", "split", "time", "event"])
            writer.writerows(rows)
        eta_a, t_a, e_a = np.array(etas), np.array(times), np.array(events)
        truth.append({**asdict(site), "n_train": int((~is_test).sum()), "n_test": int(is_test.sum()),
                      "prior_true": float(label.mean()), "event_rate": float(e_a.mean()),
                      "n_events_test": int(e_a[is_test].sum()),
                      "median_follow_up_days": float(np.median(t_a)),
                      "c_index_ceiling_test": c_index(t_a[is_test], e_a[is_test], eta_a[is_test]),
                      "c_index_ceiling_all": c_index(t_a, e_a, eta_a)})
        folders.append(folder)
    (out_dir / TRUTH_FILE).write_text(json.dumps({
        "seed": seed, "kind": "series",
        "risk_model": {"log_hazard_ratio": "sum of coefficient * (feature - centre) / scale",
                       "features": {k: {"coefficient": b, "centre": m, "scale": s} for k, (b, m, s) in FEATURES.items()},
                       "weibull_shape": WEIBULL_SHAPE, "weibull_scale_days": WEIBULL_SCALE_DAYS},
        "sites": truth}, indent=2) + "\n", encoding="utf-8")
    return folders


def make_series(out: Path, *, seed: int = 0, n_patients: int | None = None) -> list[Path]:
    """`generate_series` of the default sites (`n_patients` each) with a progress bar."""
    from rich.progress import Progress

    specs = default_series_sites() if n_patients is None else default_series_sites(n_patients)
    with Progress(transient=True) as progress:
        task = progress.add_task(f"writing synthetic CT series to {out}", total=sum(s.n_patients for s in specs))
        return generate_series(out, sites=specs, seed=seed, on_patient=lambda name, i: progress.advance(task))
