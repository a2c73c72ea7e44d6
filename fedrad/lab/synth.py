"""Deterministic synthetic multi-center CT data set: 2-D lesion slices as real DICOM files.

This is fedrad's built-in demo and test data. Each hospital site gets a folder
``<out_dir>/<site>/`` with ``images/<patient>.dcm`` (one axial slice per patient) and a
``labels.csv`` index; ``<out_dir>/truth.json`` records the simulation ground truth.

Why it looks the way it does:
    * Class (benign 0 / malignant 1) is carried by lesion *shape and texture* through a
      latent malignancy score, never by mean intensity, so a CNN must learn morphology.
    * The class-conditional scores overlap (N(+1, 0.8) vs N(-1, 0.8)), so even a perfect
      observer of ``s`` tops out near AUC 0.96; shape jitter and noise bring a strong
      classifier to roughly 0.9-0.95.
    * Sites differ like real scanners: pixel spacing (geometry is built in mm and
      rasterised per site), reconstruction kernel, noise, HU calibration offset, stored
      value encoding (rescale slope), prevalence (label shift) and size.
    * At the two label-shift sites the *deployment* population (the unlabelled images a
      site will be asked to read) has another prevalence than the labelled one (screening
      0.30 -> 0.60, referral 0.90 -> 0.55): that is the case EM and BBSE exist for. Drawing
      the unlabelled rows from the site's own labelled population (the data before this
      change, still written by ``legacy=True``) makes the labelled prior as good as any
      estimate. A labelled *deployment evaluation set* from the same population is written
      to ``deploy-audit.csv``, outside labels.csv: the site reads it only to score its
      corrections (`fedrad.client.deploy_eval`), never to train or calibrate.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from scipy import ndimage

from fedrad.client.deploy_eval import AUDIT_FILE
from fedrad.lab.synth_lesion import LesionShape, lesion_alpha, lesion_hu, lung_background, sample_lesion

DEFAULT_DATA = Path("data/synthetic")  # where the command line writes and finds the built-in data
TRUTH_FILE = "truth.json"  # the simulation's ground truth, beside the site folders


@dataclass(frozen=True)
class SiteSpec:
    """One simulated hospital: cohort, labelling habits and scanner.

    Attributes:
        name: Folder name, e.g. ``"site-a"`` (letters, digits, ``.``, ``_``, ``-``).
        n_patients: Patients, one slice each (>= 1).
        prevalence: Fraction malignant before any ``label_threshold`` flips, in [0, 1].
            The count is exact: ``round(prevalence * n_patients)``.
        spacing_mm: In-plane pixel spacing (mm, square pixels).
        noise_hu: SD of additive white Gaussian noise (HU), applied after the kernel.
        kernel: ``"smooth"`` (Gaussian blur, sigma 0.6 mm) or ``"sharp"`` (unsharp mask,
            sigma 1.0 mm, amount 1.0: edge overshoot like a B70f lung kernel).
        hu_offset: Calibration offset added to every HU value (scanner miscalibration).
        manufacturer: Written to the Manufacturer tag; also picks kernel names.
        label_threshold: Concept-shift knob ``t`` on the latent score ``s``. 0 is standard.
            Patients whose ``s`` lies between 0 and ``t`` get the label a reader with
            threshold ``t`` would give, ``1 if s > t else 0``: ``t > 0`` calls borderline
            malignant lesions benign, ``t < 0`` calls borderline benign ones malignant.
        unlabelled_fraction: Fraction of TRAIN rows whose label is left empty, in [0, 1].
        test_fraction: Fraction of each class put in the test split, in (0, 1).
        rescale_slope: DICOM RescaleSlope (> 0): ``HU = stored * slope + intercept``.
        rescale_intercept: DICOM RescaleIntercept (HU).
        n_deploy: Extra patients of the *deployment* population whose images are unlabelled
            rows of labels.csv (split ``train``, label empty). 0 = none (then
            ``unlabelled_fraction`` may hide labels of the labelled population instead).
        n_deploy_eval: Extra deployment patients whose labels go only to ``deploy-audit.csv``
            (the deployment evaluation set; not in labels.csv).
        deploy_prevalence: Fraction malignant of the deployment population (exact count per
            group, before ``label_threshold`` flips); None = ``prevalence`` (no prior shift).
    """

    name: str
    n_patients: int
    prevalence: float
    spacing_mm: float
    noise_hu: float
    kernel: str
    hu_offset: float
    manufacturer: str
    label_threshold: float = 0.0
    unlabelled_fraction: float = 0.0
    test_fraction: float = 0.3
    rescale_slope: float = 1.0
    rescale_intercept: float = -1024.0
    n_deploy: int = 0
    n_deploy_eval: int = 0
    deploy_prevalence: float | None = None

    @property
    def has_deployment(self) -> bool:
        """Whether this site has a deployment population of its own (the data before it had none)."""
        return bool(self.n_deploy or self.n_deploy_eval)

    def __post_init__(self) -> None:
        def finite(v: object) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        name_ok = isinstance(self.name, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name)
        n_ok = isinstance(self.n_patients, int) and not isinstance(self.n_patients, bool)

        def count(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= 0

        checks = [  # (field, holds, what must hold)
            ("name", bool(name_ok), "a plain folder name (letters, digits, '.', '_', '-')"),
            ("n_patients", n_ok and self.n_patients >= 1, "an integer >= 1"),
            ("prevalence", finite(self.prevalence) and 0 <= self.prevalence <= 1, "in [0, 1]"),
            ("spacing_mm", finite(self.spacing_mm) and self.spacing_mm > 0, "> 0 mm"),
            ("noise_hu", finite(self.noise_hu) and self.noise_hu >= 0, ">= 0 HU"),
            ("kernel", self.kernel in ("smooth", "sharp"), "'smooth' or 'sharp'"),
            ("hu_offset", finite(self.hu_offset), "a finite number of HU"),
            ("manufacturer", isinstance(self.manufacturer, str) and self.manufacturer != "", "non-empty"),
            ("label_threshold", finite(self.label_threshold), "a finite number"),
            ("unlabelled_fraction", finite(self.unlabelled_fraction) and 0 <= self.unlabelled_fraction <= 1,
             "in [0, 1]"),
            ("test_fraction", finite(self.test_fraction) and 0 < self.test_fraction < 1, "in (0, 1)"),
            ("rescale_slope", finite(self.rescale_slope) and self.rescale_slope > 0, "> 0"),
            ("rescale_intercept", finite(self.rescale_intercept), "a finite number of HU"),
            ("n_deploy", count(self.n_deploy), "an integer >= 0"),
            ("n_deploy_eval", count(self.n_deploy_eval), "an integer >= 0"),
            ("deploy_prevalence", self.deploy_prevalence is None or (finite(self.deploy_prevalence)
                                                                      and 0 <= self.deploy_prevalence <= 1),
             "None or in [0, 1]"),
            ("unlabelled_fraction", not (self.unlabelled_fraction and self.n_deploy),
             "0 when n_deploy > 0 (the unlabelled rows are the deployment images)"),
        ]
        for field, holds, what in checks:
            if not holds:
                got = getattr(self, field)
                raise ValueError(f"SiteSpec {self.name!r}: {field} must be {what}, got {got!r}")


def default_sites() -> list[SiteSpec]:
    """The demo federation: `legacy_sites` with a deployment population at the two label-shift sites.

    site-a (screening) labels 675 patients at prevalence 0.30 (325 train, 350 test) and is
    deployed on a population at 0.60: 325 unlabelled images (EM's pool) and a 300-image
    deployment evaluation set. site-b (referral) labels 1034 at 0.90 (325 train, 709 test)
    and is deployed at 0.55: 700 unlabelled, 300 for evaluation. The shift (0.30 and 0.35)
    is larger than the 0.25 at which correcting to the labelled prior stops being a fair
    stand-in for an estimate. A pool of 300+ images keeps EM's error near 0.03 with a
    0.9-AUC model; 300 evaluation images put an ECE floor near 0.03. site-c, -d and -e are
    unchanged (no deployment images). 4,420 patients in all.
    """
    a, b, *rest = legacy_sites()
    a = dataclasses.replace(a, n_patients=675, test_fraction=0.52, unlabelled_fraction=0.0, n_deploy=325,
                            n_deploy_eval=300, deploy_prevalence=0.60)
    b = dataclasses.replace(b, n_patients=1034, test_fraction=0.686, unlabelled_fraction=0.0, n_deploy=700,
                            n_deploy_eval=300, deploy_prevalence=0.55)
    return [a, b, *rest]


def legacy_sites() -> list[SiteSpec]:
    """The demo federation before deployment shift (`fedrad synth --legacy`): 5 sites, 3795 patients.

    Its unlabelled rows are drawn from each site's own labelled population, so the
    labelled, test and unlabelled priors agree in expectation; kept so that figures
    measured on it can be reproduced byte for byte.

    site-a (a screening centre, prevalence 0.30) and site-b (an oncology referral centre,
    prevalence 0.90: strong label shift) each train on 325 labelled images. site-a (1000
    patients) keeps a 350-image labelled test split and 325 unlabelled deployment images;
    site-b (2025 patients) keeps 709 and 991. Label-shift estimation needs hundreds of both
    held-out kinds: a prior estimated on ~300 images of a 0.9-AUC model, calibrated on ~300
    labelled ones, is good to about ±0.03 (one SD), while unlabelled and test images cost
    one prefix pass each. At 0.9 prevalence ±0.02 in the prior is ±0.25 in log-odds, as much
    miscalibration as the correction removes, and the ECE of 350 perfectly calibrated
    posteriors is already ~0.02: with 325 / 350 images site-b's ECE gain could not be told
    from noise (1.3-2.4x in five runs), with ~1000 / ~700 it can (EM error <= 0.005, ECE
    3.6-7.2x lower in three seeds);
    site-c is small and low-prevalence (the site that gains most from federation): 48
    labelled training images, 10 of them malignant;
    site-d stores values at slope 0.5, so its raw integers are not HU, and its scanner reads
    150 HU high (a miscalibrated scanner): strong enough that intensity harmonisation
    measurably lowers its feature shift (`fedrad shift`); at +20 HU it barely registered;
    it trains on 84 labelled images;
    site-e labels by a stricter rule (concept shift, `label_threshold` -1.2: lesions up to
    1.2 units of the latent score below the usual threshold are called malignant), which
    no prior correction can undo; its 100 test images are enough to judge that.

    The small sites are small in what they *train* on; their held-out test splits are large
    (c: 192 images, 38 malignant; d: 196) because a simulation may measure precisely: with
    the 32 test images (6 malignant) site-c once had, one AUC's standard error (~0.05) was
    larger than the 0.02 gaps between strategies that `fedrad compare` must resolve.
    """
    return [
        SiteSpec("site-a", 1000, 0.30, 0.70, 15.0, "smooth", 0.0, "Siemens", test_fraction=0.35, unlabelled_fraction=0.5),
        SiteSpec("site-b", 2025, 0.90, 0.90, 25.0, "sharp", 40.0, "GE", test_fraction=0.35, unlabelled_fraction=0.753),
        SiteSpec("site-c", 240, 0.20, 0.60, 10.0, "smooth", -30.0, "Philips", test_fraction=0.8),
        SiteSpec("site-d", 280, 0.45, 1.00, 35.0, "sharp", 150.0, "Canon", test_fraction=0.7, rescale_slope=0.5),
        SiteSpec("site-e", 250, 0.35, 0.80, 20.0, "smooth", -15.0, "Siemens", label_threshold=-1.2, test_fraction=0.4),
    ]


def render_slice(
    rng: np.random.Generator, score: float, spacing_mm: float, image_size: int
) -> tuple[np.ndarray, np.ndarray, LesionShape]:
    """Clean (pre-scanner) slice for one patient.

    Returns:
        ``(hu, alpha, shape)``: HU image before kernel/noise/offset, lesion coverage in
        [0, 1] per pixel, and the lesion's physical description.
    """
    background = lung_background(rng, spacing_mm, image_size)
    shape = sample_lesion(rng, score, extent_mm=spacing_mm * image_size)
    alpha = lesion_alpha(shape, spacing_mm, image_size)
    tissue = lesion_hu(shape, alpha, spacing_mm, rng)
    return background + alpha * (tissue - background), alpha, shape


def apply_scanner(hu: np.ndarray, site: SiteSpec, rng: np.random.Generator) -> np.ndarray:
    """Scanner effects in HU, in order: reconstruction kernel, noise, calibration offset."""
    if site.kernel == "smooth":
        hu = ndimage.gaussian_filter(hu, sigma=0.6 / site.spacing_mm)
    else:
        hu = hu + 1.0 * (hu - ndimage.gaussian_filter(hu, sigma=1.0 / site.spacing_mm))
    return hu + rng.normal(0.0, site.noise_hu, size=hu.shape) + site.hu_offset


def _kernel_name(manufacturer: str, kernel: str) -> str:
    """Vendor-style ConvolutionKernel string for a smooth or sharp reconstruction."""
    names = {"siemens": ("B30f", "B70f"), "ge": ("STANDARD", "LUNG"),
             "philips": ("B", "L"), "canon": ("FC03", "FC51")}
    smooth, sharp = names.get(manufacturer.lower(), ("B30f", "B70f"))
    return smooth if kernel == "smooth" else sharp


def _write_dicom(path: Path, hu: np.ndarray, site: SiteSpec, patient_id: str, seed: int, z_mm: float) -> None:
    """Stores HU as integers (``round((HU - intercept) / slope)``) in a CT Image DICOM file.

    HU are first clipped to the CT range [-1024, 3071]. Storage is unsigned 16 bit
    (PixelRepresentation 0) unless the intercept makes -1024 HU negative, then signed.
    UIDs are hashed from (seed, site, patient), so reruns give byte-identical files.
    """
    slope, intercept = site.rescale_slope, site.rescale_intercept
    signed = (-1024.0 - intercept) / slope < 0
    dtype = np.dtype("<i2" if signed else "<u2")
    info = np.iinfo(dtype)
    stored = np.rint((np.clip(hu, -1024.0, 3071.0) - intercept) / slope)
    stored = np.clip(stored, info.min, info.max).astype(dtype)

    def uid(kind: str) -> str:
        return generate_uid(entropy_srcs=["fedrad-synth", str(seed), site.name, patient_id, kind])

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = uid("sop")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uid("study"), uid("series")
    ds.FrameOfReferenceUID = uid("frame")
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    ds.Modality, ds.BodyPartExamined = "CT", "CHEST"
    ds.PatientID, ds.PatientName = patient_id, f"Synthetic^{patient_id}"
    ds.PatientBirthDate, ds.PatientSex = "", "O"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.StudyID, ds.AccessionNumber, ds.SeriesNumber, ds.InstanceNumber = "1", "", 1, 1
    ds.StudyDescription = "fedrad synthetic chest CT"
    ds.Manufacturer, ds.ManufacturerModelName = site.manufacturer, "fedrad-synth"
    ds.InstitutionName = site.name
    ds.KVP, ds.ConvolutionKernel = "120", _kernel_name(site.manufacturer, site.kernel)
    ds.SliceThickness, ds.SliceLocation = "1.0", f"{z_mm:.1f}"
    ds.PixelSpacing = [f"{site.spacing_mm:.6g}"] * 2
    half = site.spacing_mm * hu.shape[0] / 2.0
    corner = -half + site.spacing_mm / 2.0  # centre of the top-left pixel, image centred at 0
    ds.ImagePositionPatient = [f"{corner:.4f}", f"{corner:.4f}", f"{z_mm:.1f}"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.Rows, ds.Columns = hu.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = int(signed)
    ds.RescaleSlope, ds.RescaleIntercept = f"{slope:.10g}", f"{intercept:.10g}"
    ds.RescaleType = "HU"
    ds.WindowCenter, ds.WindowWidth = "-600", "1500"  # lung window, in HU
    ds.PixelData = stored.tobytes()
    ds.save_as(path, enforce_file_format=True)


def _assign_labels(
    site: SiteSpec, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Labels, latent scores and splits for a site.

    Returns:
        ``(label, score, is_test, unlabelled)``: per-patient int labels after the
        ``label_threshold`` flips, latent scores, test-split mask, hidden-label mask.
    """
    n = site.n_patients
    latent = np.zeros(n, dtype=int)
    latent[rng.permutation(n)[: int(site.prevalence * n + 0.5)]] = 1
    score = rng.normal(np.where(latent == 1, 1.0, -1.0), 0.8)
    t = site.label_threshold
    band = (score > min(0.0, t)) & (score <= max(0.0, t))
    label = np.where(band, (score > t).astype(int), latent)
    is_test = np.zeros(n, dtype=bool)
    for c in (0, 1):  # stratified; >= 5 test cases per class when the class has >= 10
        idx = np.flatnonzero(label == c)
        k = max(int(site.test_fraction * idx.size + 0.5), min(5, idx.size // 2))
        is_test[rng.choice(idx, size=k, replace=False)] = True
    train = np.flatnonzero(~is_test)
    unlabelled = np.zeros(n, dtype=bool)
    unlabelled[rng.choice(train, size=int(site.unlabelled_fraction * train.size + 0.5), replace=False)] = True
    return label, score, is_test, unlabelled


def _assign_deployment(site: SiteSpec, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels, latent scores and evaluation mask of the site's deployment patients (pool first, then eval).

    Each group holds exactly ``round(deploy_prevalence * size)`` latent malignant cases, so the
    pool EM reads and the set its corrections are scored on share one prior; the site's
    ``label_threshold`` applies as in its labelled population.
    """
    prevalence = site.prevalence if site.deploy_prevalence is None else site.deploy_prevalence
    latent = []
    for size in (site.n_deploy, site.n_deploy_eval):
        group = np.zeros(size, dtype=int)
        group[rng.permutation(size)[: int(prevalence * size + 0.5)]] = 1
        latent.append(group)
    latent_all = np.concatenate(latent)
    score = rng.normal(np.where(latent_all == 1, 1.0, -1.0), 0.8)
    t = site.label_threshold
    band = (score > min(0.0, t)) & (score <= max(0.0, t))
    label = np.where(band, (score > t).astype(int), latent_all)
    return label, score, np.arange(label.size) >= site.n_deploy


def _write_index(path: Path, rows: list[list[str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["image", "label", "split", "roi_x", "roi_y"])
        writer.writerows(rows)


def generate(
    out_dir: Path,
    *,
    sites: Sequence[SiteSpec] | None = None,
    seed: int = 0,
    image_size: int = 160,
    on_site_done: Callable[[str, int], None] | None = None,
) -> list[Path]:
    """Writes the synthetic data set; same arguments give byte-identical files.

    Layout: ``out_dir/<site.name>/images/<patient>.dcm``, ``out_dir/<site.name>/labels.csv``
    (columns ``image,label,split,roi_x,roi_y``; ROI = lesion centre in px, column/row) and
    ``out_dir/truth.json``; a site with a deployment evaluation set also gets
    ``deploy-audit.csv`` (same columns, split ``test``; its images are not in labels.csv).
    Existing files of the same name are overwritten, a stale ``deploy-audit.csv`` is
    removed; other files are left alone (labels.csv is the index). Sites without a
    deployment population are written exactly as before it existed.

    Args:
        out_dir: Root folder, created if missing.
        sites: Site specs (unique names); ``default_sites()`` when None.
        seed: Non-negative integer; each site draws from ``SeedSequence([seed, index])``.
        image_size: Rows = columns of every slice (px, >= 32).
        on_site_done: Progress hook called as ``(site_name, n_images_written)``.

    Returns:
        The site folders, in the order of ``sites``.

    Raises:
        ValueError: On empty or duplicate site names, a negative seed or a too small image.
    """
    sites = default_sites() if sites is None else list(sites)
    names = [s.name for s in sites]
    if not sites or len(set(names)) != len(names):
        raise ValueError(f"sites must be a non-empty list with unique names, got {names}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    seed = int(seed)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 32:
        raise ValueError(f"image_size must be an integer >= 32 px, got {image_size!r}")
    out_dir = Path(out_dir)
    folders, truth = [], []
    for index, site in enumerate(sites):
        folder = out_dir / site.name
        (folder / "images").mkdir(parents=True, exist_ok=True)
        n_deploy = site.n_deploy + site.n_deploy_eval
        # Children of a SeedSequence depend on their index only: the first n_patients + 1 are the same
        # whatever follows, so a site without deployment patients is drawn exactly as before they existed.
        streams = np.random.SeedSequence([seed, index]).spawn(site.n_patients + 1 + n_deploy + bool(n_deploy))
        label, score, is_test, unlabelled = _assign_labels(site, np.random.default_rng(streams[0]))
        d_label, d_score, d_eval = (_assign_deployment(site, np.random.default_rng(streams[-1])) if n_deploy
                                    else (np.zeros(0, int), np.zeros(0), np.zeros(0, bool)))
        rows, audit = [], []
        for i in range(site.n_patients + n_deploy):
            rng = np.random.default_rng(streams[i + 1])
            patient_id = f"{site.name}-{i + 1:04d}"
            z_mm = float(rng.uniform(-250.0, -50.0))
            j = i - site.n_patients  # index among the deployment patients (< 0: labelled population)
            hu, _, shape = render_slice(rng, float(score[i] if j < 0 else d_score[j]), site.spacing_mm, image_size)
            _write_dicom(folder / "images" / f"{patient_id}.dcm", apply_scanner(hu, site, rng),
                         site, patient_id, seed, z_mm)
            cx, cy = (c / site.spacing_mm - 0.5 for c in shape.center_mm)
            where = f"images/{patient_id}.dcm"
            if j < 0:
                rows.append([where, "" if unlabelled[i] else str(int(label[i])),
                             "test" if is_test[i] else "train", f"{cx:.1f}", f"{cy:.1f}"])
            elif d_eval[j]:
                audit.append([where, str(int(d_label[j])), "test", f"{cx:.1f}", f"{cy:.1f}"])
            else:
                rows.append([where, "", "train", f"{cx:.1f}", f"{cy:.1f}"])
        _write_index(folder / "labels.csv", rows)
        if audit:
            _write_index(folder / AUDIT_FILE, audit)
        else:
            (folder / AUDIT_FILE).unlink(missing_ok=True)
        spec = asdict(site)
        if not site.has_deployment:  # truth.json as it was before deployment shift existed
            for key in ("n_deploy", "n_deploy_eval", "deploy_prevalence"):
                spec.pop(key)
        pool = d_label[~d_eval]
        hidden = np.concatenate([label[unlabelled], pool])
        entry = {**spec, "n_train": int((~is_test).sum()) + int(pool.size), "n_test": int(is_test.sum()),
                 "n_unlabelled": int(hidden.size), "prior_true": float(label.mean()),
                 # P(malignant) among the unlabelled rows: what a site's EM/BBSE estimates are measured against
                 "prior_unlabelled_true": float(hidden.mean()) if hidden.size else None}
        if site.has_deployment:
            entry.update(prior_labelled_true=float(label.mean()), prior_deploy_true=float(d_label.mean()),
                         prior_deploy_eval_true=float(d_label[d_eval].mean()) if d_eval.any() else None)
        truth.append(entry)
        folders.append(folder)
        if on_site_done is not None:
            on_site_done(site.name, site.n_patients + n_deploy)
    truth_text = json.dumps({"seed": seed, "sites": truth}, indent=2) + "\n"
    (out_dir / TRUTH_FILE).write_text(truth_text, encoding="utf-8")
    return folders


def make_synthetic(out: Path, *, seed: int = 0, legacy: bool = False) -> list[Path]:
    """Generate the default synthetic sites into `out` (`legacy`: the data before deployment shift), with a progress bar."""
    from rich.progress import Progress

    specs = legacy_sites() if legacy else default_sites()
    with Progress(transient=True) as progress:
        task = progress.add_task(f"writing synthetic DICOM to {out}", total=len(specs))
        folders = generate(out, sites=specs, seed=seed, on_site_done=lambda name, n: progress.advance(task))
    total = sum(s.n_patients + s.n_deploy + s.n_deploy_eval for s in specs)
    logging.getLogger("fedrad").info("wrote %d sites, %d patients, to %s", len(folders), total, out)
    return folders


def load_truth(data_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Per-site simulation truth from `<data_dir>/truth.json`, by site name; {} for real data.

    Only the lab reads it (and hands it to the report): the coordinator never reads generator files.
    """
    path = Path(data_dir) / TRUTH_FILE if data_dir else None
    if path is None or not path.is_file():
        return {}
    try:
        return {s["name"]: s for s in json.loads(path.read_text())["sites"]}
    except (ValueError, KeyError, TypeError):
        return {}
