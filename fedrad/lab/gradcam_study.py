"""Does Grad-CAM point at the lesion? The pointing game on the synthetic data, vs a randomised-weights model.

The generator is deterministic, so each patient's lesion coverage (`render_slice`'s alpha) can
be drawn again exactly; pushed through the same resample/crop as the image (`ResampleCrop`
about labels.csv's ROI), it gives the lesion mask on the CNN input. Per image and layer:

- *pointing game*: is the map's maximum inside the lesion's bounding box?
- *mass in box*: the share of the map's sum inside that box.

Both also for the same architecture with randomised weights (Adebayo et al. 2018, "Sanity checks
for saliency maps": a map that does not change when the weights are randomised explains the
input, not the model). Crops are centred on the lesion, so a map that only favours the centre
already scores well: the box's share of the crop (`box_fraction`) is the uniform map's
mass-in-box, the baseline to beat. Lab only: it reads the generator's truth.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fedrad.client.gradcam import gradcam_maps
from fedrad.client.predict import SiteFolder
from fedrad.client.site_model import SiteModel
from fedrad.common.dicom import DicomImage
from fedrad.common.preprocess import ResampleCrop
from fedrad.lab.synth import TRUTH_FILE, SiteSpec, _assign_labels, render_slice

STUDY_LAYERS = ("block11", "block13", "block15", "block16", "head")


def lesion_masks(spec: SiteSpec, seed: int, site_index: int, patients: list[int], rois: list[tuple[float, float]],
                 crop: ResampleCrop, *, image_size: int = 160) -> np.ndarray:
    """(N, S, S) bool lesion masks (alpha ≥ 0.5) on the CNN input of `patients` (0-based) of `spec`'s site."""
    streams = np.random.SeedSequence([seed, site_index]).spawn(spec.n_patients + 1)
    masks = []
    for i, (x, y) in zip(patients, rois):
        if i >= spec.n_patients:
            raise ValueError(f"patient {i + 1} of {spec.name} is a deployment patient; the study uses labelled ones.")
        rng = np.random.default_rng(streams[i + 1])
        rng.uniform(-250.0, -50.0)  # z position: drawn first by the generator
        _, alpha, _ = render_slice(rng, _score(spec, seed, site_index)[i], spec.spacing_mm, image_size)
        image = DicomImage(values=alpha.astype(np.float32), spacing_mm=(spec.spacing_mm, spec.spacing_mm),
                           modality="CT", path=Path(f"{spec.name}-{i + 1:04d}-lesion"))
        masks.append(crop(image, (y, x)) >= 0.5)
    return np.stack(masks)


def _score(spec: SiteSpec, seed: int, site_index: int) -> np.ndarray:
    streams = np.random.SeedSequence([seed, site_index]).spawn(spec.n_patients + 1)
    return _assign_labels(spec, np.random.default_rng(streams[0]))[1]


def box_of(mask: np.ndarray) -> tuple[slice, slice] | None:
    rows, cols = np.nonzero(mask)
    return None if rows.size == 0 else (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))


def localisation(maps: np.ndarray, masks: np.ndarray) -> dict[str, float]:
    """Pointing-game hit rate, mean mass in the lesion's box, mean box share of the crop (the uniform baseline)."""
    hits, mass, share = [], [], []
    for cam, mask in zip(maps, masks):
        box = box_of(mask)
        if box is None or cam.sum() <= 0:
            continue
        inside = np.zeros_like(mask)
        inside[box] = True
        hits.append(bool(inside.flat[int(np.argmax(cam))]))
        mass.append(float(cam[inside].sum() / cam.sum()))
        share.append(float(inside.mean()))
    n = len(hits)
    return {"n": n, "pointing_game": float(np.mean(hits)) if n else float("nan"),
            "mass_in_box": float(np.mean(mass)) if n else float("nan"),
            "box_fraction": float(np.mean(share)) if n else float("nan")}


def pointing_game(site: SiteModel, randomised: SiteModel, folder: SiteFolder, data_root: Path, *,
                  layers: tuple[str, ...] = STUDY_LAYERS, malignant_only: bool = True,
                  split: str = "test") -> dict[str, Any]:
    """Per layer: localisation of `site`'s model and of `randomised` on the site's (malignant) `split` images."""
    import csv

    import dataclasses
    import json

    truth = json.loads((Path(data_root) / TRUTH_FILE).read_text())  # the generator's parameters, per site
    known = {f.name for f in dataclasses.fields(SiteSpec)}
    specs = {t["name"]: (i, SiteSpec(**{k: v for k, v in t.items() if k in known})) for i, t in enumerate(truth["sites"])}
    seed = int(truth["seed"])
    name = folder.data.name
    if name not in specs:
        raise ValueError(f"{name} is not a site of {Path(data_root) / TRUTH_FILE} ({sorted(specs)}).")
    index, spec = specs[name]
    with open(Path(data_root) / name / "labels.csv", newline="") as fh:
        roi = {r["image"]: (float(r["roi_x"]), float(r["roi_y"])) for r in csv.DictReader(fh)}
    x_all = np.concatenate([folder.data.x_train, folder.data.x_test, folder.data.x_unlabelled])
    chosen = [i for i, (s, y) in enumerate(zip(folder.splits, folder.labels))
              if s == split and (y == 1 or (not malignant_only and y >= 0))]
    paths = [folder.paths[i] for i in chosen]
    patients = [int(Path(p).stem.rsplit("-", 1)[1]) - 1 for p in paths]
    masks = lesion_masks(spec, seed, index, patients, [roi[p] for p in paths], ResampleCrop(
        spacing_mm=site.cfg.spacing_mm, fov_mm=site.cfg.fov_mm, order=1))
    x = x_all[chosen]
    out: dict[str, Any] = {"site": name, "n_images": len(chosen), "layers": {}}
    for layer in layers:
        out["layers"][layer] = {"model": localisation(gradcam_maps(site.model, x, layer=layer), masks),
                                "randomised": localisation(gradcam_maps(randomised.model, x, layer=layer), masks)}
    return out


def randomised_copy(site: SiteModel) -> SiteModel:
    """The same architecture with every weight re-drawn (PyTorch's default init; BN statistics 0 / 1)."""
    import dataclasses

    import torch

    from fedrad.common.efficientnet_lite import efficientnet_lite0

    torch.manual_seed(1234)
    model = efficientnet_lite0(pretrained=False, num_classes=2, seed=1234).to(memory_format=torch.channels_last)
    return dataclasses.replace(site, model=model.eval(), bn="randomised weights")


def main(argv: list[str] | None = None) -> int:
    """python -m fedrad.lab.gradcam_study RUN_DIR SITE_WORK DATA_ROOT SITE [--all-labels]: the table as JSON."""
    import argparse
    import json

    from fedrad.cli_site import load_run
    from fedrad.client.predict import read_site_folder
    from fedrad.client.site_model import assemble
    from fedrad.common.preprocess import Preprocessor

    parser = argparse.ArgumentParser(prog="python -m fedrad.lab.gradcam_study", description=main.__doc__)
    for name in ("run_dir", "site_work", "data_root"):
        parser.add_argument(name, type=Path)
    parser.add_argument("site")
    parser.add_argument("--all-labels", action="store_true", help="benign test images too (default: malignant)")
    args = parser.parse_args(argv)
    site = assemble(load_run(args.run_dir), work=args.site_work, bn="site", site=args.site)
    folder = read_site_folder(args.data_root / args.site, Preprocessor(spacing_mm=site.cfg.spacing_mm,
                                                                       fov_mm=site.cfg.fov_mm))
    result = pointing_game(site, randomised_copy(site), folder, args.data_root, malignant_only=not args.all_labels)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
