"""`fedrad predict` at a site: score a folder of DICOM with the site's model, keep everything local.

The folder is read like a training site (labels.csv, `fedrad.client.dataset.load_site`, the
run's preprocessing): a bad row or file is skipped with the reason that training gives, and
labels may be absent (an empty label is an unlabelled row). Each image is scored once, per
labels.csv split in file order, the way the run's evaluation scored it, so the site's test split
gets the run's own test AUC back.

Written to `--out` only: `predictions.csv` (one row per image read), `model-card.json`
(`fedrad.client.model_card`) and `skipped.csv` (the files left out and why). Nothing is sent.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedrad.client.dataset import SiteData, load_site, row_key
from fedrad.client.labels import Skipped, read_labels
from fedrad.common.preprocess import Preprocessor

log = logging.getLogger("fedrad.site")
BUCKETS = ("train", "test", "unlabelled")
SPLITS = ("train", "test", "all")
COLUMNS = ("image", "split", "label", "probability", "probability_corrected", "probability_personalised",
           "decision", "prior", "model_sha256")


@dataclass
class ScoredImages:
    """One site folder's images, scored: per image its labels.csv path, split, label (-1 = none), patient."""

    images: list[str]
    splits: list[str]
    labels: np.ndarray
    patients: list[str]
    x: np.ndarray  # (N, 3, S, S) CNN inputs, labels.csv order
    probabilities: dict[str, np.ndarray]
    logits: np.ndarray
    skipped: list[Skipped]

    def subset(self, split: str) -> np.ndarray:
        """Indices of images in `split` ("train" includes unlabelled rows, "all" = every image)."""
        return split_indices(self.splits, split)


def split_indices(splits: list[str], split: str) -> np.ndarray:
    """Indices of the images whose split is `split` ("all" = every image)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}; got {split!r}.")
    return np.array([i for i, s in enumerate(splits) if split in ("all", s)], dtype=int)


def rows_of(data_dir: Path, data: SiteData, preprocessor: Preprocessor) -> dict[str, list[tuple[str, int]]]:
    """Per bucket, the (labels.csv path, label; the event with target survival) of each loaded image, in array order.

    `load_site` keeps each bucket in labels.csv order and drops skipped rows; a row's content
    key (`fedrad.client.dataset.row_key`: file bytes + ROI, or a series' files + mask + slice
    mode) tells whether it is the bucket's next loaded image.
    """
    keys = {"train": data.keys_train, "test": data.keys_test, "unlabelled": data.keys_unlabelled}
    out: dict[str, list[tuple[str, int]]] = {b: [] for b in BUCKETS}
    survival = getattr(preprocessor, "target", "label") == "survival"  # rows scored on time + event: y = event
    for row in read_labels(Path(data_dir) / "labels.csv", []):
        target = row.event if survival else row.label
        bucket = "unlabelled" if target is None else row.split
        pos = len(out[bucket])
        if pos >= len(keys[bucket]):
            continue
        if row_key(Path(data_dir), row, preprocessor) == keys[bucket][pos]:
            out[bucket].append((row.image, -1 if target is None else target))
    for bucket in BUCKETS:
        if len(out[bucket]) != len(keys[bucket]):
            raise ValueError(f"{data_dir}: labels.csv changed while it was read; run again.")
    return out


def patient_ids(data_dir: Path) -> dict[str, str]:
    """labels.csv's optional `patient` column, by image path (an image without one is its own patient)."""
    with open(Path(data_dir) / "labels.csv", encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh)
        fields = {(f or "").strip().lower(): f for f in reader.fieldnames or []}
        if "patient" not in fields:
            return {}
        return {(r.get(fields["image"]) or "").strip(): (r.get(fields["patient"]) or "").strip() for r in reader}


@dataclass
class SiteFolder:
    """A site folder read once: its arrays and, per image in bucket order, path, split, label, patient."""

    data: SiteData
    paths: list[str]
    splits: list[str]
    labels: np.ndarray
    patients: list[str]

    def all_images(self) -> np.ndarray:
        """Every readable image (what AdaBN may look at; labels never read)."""
        return np.concatenate([self.data.x_train, self.data.x_test, self.data.x_unlabelled])


def read_site_folder(data_dir: Path, preprocessor: Preprocessor) -> SiteFolder:
    """Read `data_dir` (labels.csv + DICOM) through `preprocessor`; bad rows and files are skipped and logged."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data folder {data_dir} not found; give a site folder with labels.csv and its DICOM.")
    data = load_site(data_dir, preprocessor)
    for s in data.skipped:
        log.warning("skipped %s: %s", s.file, s.reason)
    rows = rows_of(data_dir, data, preprocessor)
    patients = patient_ids(data_dir)
    paths, splits, labels = [], [], []
    for bucket in BUCKETS:
        for image, label in rows[bucket]:
            paths.append(image)
            splits.append("test" if bucket == "test" else "train")
            labels.append(label)
    return SiteFolder(data, paths, splits, np.asarray(labels, dtype=np.int64), [patients.get(p) or p for p in paths])


def score_folder(folder: SiteFolder, outputs: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
                 posteriors: Callable[[np.ndarray, np.ndarray], dict[str, np.ndarray]],
                 *, split: str = "all") -> ScoredImages:
    """Score the images of `split` with `outputs` (x -> logits, features) and `posteriors`, one bucket at a time."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}; got {split!r}.")
    data = folder.data
    arrays = {"train": data.x_train, "test": data.x_test, "unlabelled": data.x_unlabelled}
    wanted = [b for b in BUCKETS if split == "all" or (split == "test") == (b == "test")]
    keep: list[int] = []
    xs, logits, probs = [], [], []
    offset = 0
    for bucket in BUCKETS:
        n = len(arrays[bucket])
        if bucket in wanted and n:
            z, f = outputs(arrays[bucket])  # one bucket at a time: the run's own batches
            keep.extend(range(offset, offset + n))
            xs.append(arrays[bucket])
            logits.append(z)
            probs.append(posteriors(z, f))
        offset += n
    if not keep:
        raise ValueError(f"{data.name}: no readable image in split {split!r} ({len(data.skipped)} skipped, see "
                         "skipped.csv); nothing to score.")
    return ScoredImages(
        images=[folder.paths[i] for i in keep], splits=[folder.splits[i] for i in keep], labels=folder.labels[keep],
        patients=[folder.patients[i] for i in keep], x=np.concatenate(xs), logits=np.concatenate(logits),
        probabilities={k: np.concatenate([p[k] for p in probs]) for k in probs[0]}, skipped=data.skipped)


def decision_column(probabilities: dict[str, np.ndarray], decide_on: str) -> str:
    """Which probability the decision thresholds: the personalised head where the site has one ("auto")."""
    if decide_on == "auto":
        return ("probability_personalised" if not np.all(np.isnan(probabilities["probability_personalised"]))
                else "probability_corrected")
    name = f"probability_{decide_on}"
    if name not in probabilities or np.all(np.isnan(probabilities[name])):
        raise ValueError(f"--decide-on {decide_on}: this model has no {decide_on} probability "
                         "(no personalised head kept at this site); use corrected.")
    return name


def write_predictions(out: Path, scored: ScoredImages, *, threshold: float, decide_on: str, prior: float,
                      model_sha256: str) -> Path:
    """predictions.csv (one row per scored image) and skipped.csv in `out`; returns the predictions path."""
    out.mkdir(parents=True, exist_ok=True)
    column = decision_column(scored.probabilities, decide_on)
    decision = scored.probabilities[column] >= threshold
    path = out / "predictions.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(COLUMNS)
        for i, image in enumerate(scored.images):
            p = {k: v[i] for k, v in scored.probabilities.items()}
            writer.writerow([image, scored.splits[i], "" if scored.labels[i] < 0 else int(scored.labels[i]),
                             f"{p['probability']:.9g}", f"{p['probability_corrected']:.9g}",
                             "" if np.isnan(p["probability_personalised"]) else f"{p['probability_personalised']:.9g}",
                             int(decision[i]), f"{prior:.6g}", model_sha256])
    write_skipped(out, scored.skipped)
    return path


def write_skipped(out: Path, skipped: list[Skipped]) -> None:
    """skipped.csv in `out`: each file left out and why (the site's own folder; nothing is sent)."""
    with open(out / "skipped.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["image", "reason"])
        writer.writerows([s.file, s.reason] for s in skipped)
