"""The pointing-game arithmetic, and the redrawn lesion masks sit where the generator put the lesion."""

import numpy as np

from fedrad.common.preprocess import ResampleCrop
from fedrad.lab.gradcam_study import lesion_masks, localisation
from fedrad.lab.synth import SiteSpec, generate


def test_localisation_counts_hits_and_mass_in_the_box():
    mask = np.zeros((2, 8, 8), bool)
    mask[:, 2:4, 2:4] = True
    maps = np.zeros((2, 8, 8))
    maps[0, 3, 3], maps[0, 7, 7] = 3.0, 1.0  # max inside, 3/4 of the mass inside
    maps[1, 0, 0], maps[1, 2, 2] = 2.0, 2.0  # first maximum outside, half the mass inside
    out = localisation(maps, mask)
    assert out["n"] == 2 and out["pointing_game"] == 0.5
    assert np.isclose(out["mass_in_box"], (0.75 + 0.5) / 2) and np.isclose(out["box_fraction"], 4 / 64)


def test_redrawn_masks_hold_the_lesion_at_the_crop_centre(tmp_path):
    import csv

    spec = SiteSpec(name="s", n_patients=4, prevalence=0.5, spacing_mm=0.8, noise_hu=10, kernel="smooth",
                    hu_offset=0, manufacturer="GE")
    generate(tmp_path, sites=[spec], seed=5, image_size=96)
    rows = list(csv.DictReader(open(tmp_path / "s" / "labels.csv")))
    rois = [(float(r["roi_x"]), float(r["roi_y"])) for r in rows]
    masks = lesion_masks(spec, 5, 0, [0, 1, 2, 3], rois, ResampleCrop(spacing_mm=0.5, fov_mm=32.0), image_size=96)
    assert masks.shape == (4, 64, 64)
    for m in masks:  # the ROI is the lesion centre: the crop centre is lesion, its corners are not
        assert m[31:33, 31:33].all() and not m[0, 0] and not m[-1, -1]
        assert 50 < m.sum() * 0.25 < 800  # mm²: a 10-24 mm lesion
