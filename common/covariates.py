"""Mask-derived radiomics covariates beside the CNN in the Cox head (run config `covariates`, task = survival).

Why: a radiomics study's strongest prognostic feature is usually the lesion's size, and a
series row's 3-D mask gives it exactly (voxel count x voxel volume), while the CNN has to
infer it from one 48 mm crop of one slice; shape and heterogeneity are the next classic
features (pyradiomics' shape Sphericity and first-order Standard Deviation). With
`covariates = "log-volume"` (or several, joined by commas) the head is a linear Cox model on
the CNN's penultimate features *and* the covariates:

    log hazard ratio = w . features + b + beta . z

i.e. a `Linear(1280 + c, 1)` split in two: the network's own `_fc` (w, b) and a bias-free
`Linear(c, 1)` registered on the model as `_covariates` (beta, zero at the start, so round 1
starts from the CNN-only head). Both are shared and averaged by the coordinator like any
trained parameter; the covariate values themselves stay at the site. beta gets its own
learning rate (`covariate-lr`): AdamW moves every parameter by about its rate per step, and
one coefficient of order 1 needs far more than the head's 0.003 x a few dozen steps.

A covariate is a function of the lesion's 3-D mask, its voxel size and (hu-sd) the voxel values
inside it, in a fixed physical unit scaled so that lesions spread over about one unit, so every
site's values mean the same and no site-level standardisation (which would need the other
sites' statistics) is involved:

* ``log-volume``: ln(volume in mL);
* ``asphericity``: 10 x (1 - sphericity), sphericity = pi^(1/3) (6V)^(2/3) / A with A the area of
  the mask's marching-cubes surface (scikit-image; pyradiomics' definition): 0 for a ball,
  growing with a lobulated margin;
* ``hu-sd``: the standard deviation of the voxel values inside the mask, in 100 HU (CT).

No Flower here.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn


def log_volume_ml(mask: np.ndarray, voxel_mm: tuple[float, float, float]) -> float:
    """ln(lesion volume in mL): voxel count x voxel volume (mm^3) / 1000; NaN for an empty mask.

    mL (cm^3) puts the small lesions of a CT study near 0 with a spread of about 1, a scale
    on which one coefficient trains as readily as the CNN head's.
    """
    voxels = int(np.count_nonzero(mask))
    return math.log(voxels * float(np.prod(voxel_mm)) / 1000.0) if voxels else math.nan


def asphericity(mask: np.ndarray, voxel_mm: tuple[float, float, float]) -> float:
    """10 x (1 - sphericity) of the mask's marching-cubes surface; NaN for an empty mask."""
    from skimage.measure import marching_cubes, mesh_surface_area

    voxels = int(np.count_nonzero(mask))
    if not voxels:
        return math.nan
    verts, faces, _, _ = marching_cubes(np.pad(mask, 1).astype(np.float32), 0.5, spacing=tuple(voxel_mm))
    volume = voxels * float(np.prod(voxel_mm))
    return 10.0 * (1.0 - math.pi ** (1 / 3) * (6 * volume) ** (2 / 3) / float(mesh_surface_area(verts, faces)))


def hu_sd(values: np.ndarray, mask: np.ndarray) -> float:
    """Standard deviation of the values inside the mask, in 100 HU; NaN for fewer than 2 voxels."""
    inside = np.asarray(values, dtype=np.float64)[np.asarray(mask, bool)]
    return float(inside.std()) / 100.0 if inside.size > 1 else math.nan


# name -> f(mask, (slice, row, col) spacing in mm, voxel values): every covariate a series row carries, in order
COVARIATES: dict[str, Callable[[np.ndarray, tuple[float, float, float], np.ndarray], float]] = {
    "log-volume": lambda mask, voxel_mm, _values: log_volume_ml(mask, voxel_mm),
    "asphericity": lambda mask, voxel_mm, _values: asphericity(mask, voxel_mm),
    "hu-sd": lambda mask, _voxel_mm, values: hu_sd(values, mask),
}
MODULE = "_covariates"  # the model attribute holding beta (state-dict key `_covariates.weight`)


def parse_covariates(spec: str) -> tuple[str, ...]:
    """Run-config `covariates` ("" = none, or names joined by commas) as a tuple; unknown names are refused."""
    names = tuple(name.strip() for name in spec.split(",") if name.strip())
    unknown = [name for name in names if name not in COVARIATES]
    if unknown or len(set(names)) != len(names):
        raise ValueError(f"covariates must be '' or distinct names from {sorted(COVARIATES)} joined by commas; "
                         f"got {spec!r}.")
    return names


def mask_covariates(mask: np.ndarray, voxel_mm: tuple[float, float, float], values: np.ndarray) -> np.ndarray:
    """(len(COVARIATES),) float64: every known covariate of one lesion (`values`: the volume), in order."""
    return np.array([fn(mask, voxel_mm, values) for fn in COVARIATES.values()], dtype=np.float64)


def select(values: np.ndarray, names: tuple[str, ...], *, site: str = "") -> np.ndarray:
    """The columns `names` of a site's (N, len(COVARIATES)) covariate array, checked complete.

    Raises:
        ValueError: a row has no value (a 2-D image row has no mask, so no volume); the
            message counts the rows and names the site, never a file.
    """
    columns = [list(COVARIATES).index(name) for name in names]
    values = np.asarray(values, dtype=np.float64).reshape(-1, len(COVARIATES))[:, columns]
    missing = int(np.count_nonzero(~np.isfinite(values).all(axis=1)))
    if missing:
        raise ValueError(f"site {site or '?'}: covariates {','.join(names)} need a series row with a non-empty "
                         f"mask for every image; {missing} of {len(values)} rows have none (2-D image rows carry "
                         "no mask). Run without covariates, or give these rows as series + mask.")
    return values


def attach(model: nn.Module, n: int) -> nn.Module:
    """Give `model` the covariate coefficients beta of `n` covariates (zero: the CNN-only head at start)."""
    head = nn.Linear(n, 1, bias=False)
    nn.init.zeros_(head.weight)
    setattr(model, MODULE, head)
    return model


def covariate_risk(model: nn.Module, z: torch.Tensor | np.ndarray) -> torch.Tensor:
    """beta . z per row (N,) of a model given its coefficients by `attach`."""
    head = getattr(model, MODULE)
    return head(torch.as_tensor(z, dtype=head.weight.dtype, device=head.weight.device))[:, 0]
