"""Anatomy drawing for the synthetic CT data set (see `fedrad.lab.synth`): lesion and lung.

A lesion is first *sampled* as a physical description in millimetres (`LesionShape`),
independent of any pixel grid, and then *rasterised* at a site's pixel spacing. That split
is what makes the spacing knob physical: the same lesion covers more pixels at 0.6 mm
than at 1.0 mm, exactly as on a real scanner.

How malignant a lesion looks is driven by one latent score ``s`` (about N(+1, 0.8) for
malignant, N(-1, 0.8) for benign). Higher ``s`` gives more and longer spicules, a more
lobulated margin and a more heterogeneous interior (granular texture and dark
necrosis-like blobs). Each of the three traits gets its own jitter around ``s``, so no
single feature reveals ``s`` exactly. The mean tissue HU is drawn independently of ``s``
and the texture is re-centred on it, so the lesion's mean intensity carries no class cue.

`lung_background` draws the lesion-free rest of the slice (parenchyma, vessels, chest
wall), also in mm. Everything here is clean anatomy in HU; scanner effects come later.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class LesionShape:
    """One lesion, described in physical units (mm, HU), independent of pixel spacing.

    Attributes:
        center_mm: Lesion centre (x, y) in image millimetres, x along columns, y along rows.
        radius_mm: Area-equivalent radius of the core ellipse before lobulation (mm).
        aspect: Long/short axis ratio of the core ellipse (>= 1).
        angle_rad: Orientation of the long axis (radians).
        harmonics: Margin lobulation as (order, relative amplitude, phase) triples; the
            margin radius is ``r(phi) = R * (1 + sum(a * cos(k*phi + p)))``.
        spikes: Spicules as (direction rad, length beyond the margin mm, base half-width mm).
        mean_hu: Mean tissue HU over the lesion core (class independent).
        grain_sd_hu: Standard deviation of the granular internal texture (HU).
        blobs: Necrosis-like dark spots as (dx mm, dy mm, radius mm, depth HU, negative),
            offsets relative to the centre.
    """

    center_mm: tuple[float, float]
    radius_mm: float
    aspect: float
    angle_rad: float
    harmonics: tuple[tuple[int, float, float], ...]
    spikes: tuple[tuple[float, float, float], ...]
    mean_hu: float
    grain_sd_hu: float
    blobs: tuple[tuple[float, float, float, float], ...]


def _sigmoid(z: np.ndarray) -> np.ndarray:
    """Maps the score to a 0..1 trait strength (0.5 at s = 0)."""
    return 1.0 / (1.0 + np.exp(-z))


def pixel_grid_mm(spacing_mm: float, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in mm: ``x_mm = (col + 0.5) * spacing``, same for rows.

    Returns:
        ``(x, y)`` shaped (1, N) and (N, 1) so they broadcast to the (rows, cols) image.
    """
    c = (np.arange(image_size, dtype=np.float64) + 0.5) * spacing_mm
    return c[None, :], c[:, None]


def sample_lesion(
    rng: np.random.Generator, score: float, extent_mm: float, margin_mm: float = 25.0
) -> LesionShape:
    """Draws a lesion whose irregularity grows with the latent malignancy score.

    Args:
        rng: Source of randomness (the patient's own generator).
        score: Latent malignancy score ``s`` (unitless, ~N(+-1, 0.8)).
        extent_mm: Side length of the square field of view (mm).
        margin_mm: Minimum distance of the centre from every image edge (mm); shrunk to
            half the extent when the image is smaller than twice the margin.

    Returns:
        The lesion in physical units. Its far reach (margin plus spicules) stays within
        22 mm of the centre, so a 48 mm crop around the centre holds the whole lesion.
    """
    m_spic, m_lob, m_tex = _sigmoid(1.8 * (score + rng.normal(0.0, 0.4, size=3)))
    radius = float(np.clip(rng.normal(16.0 + 1.5 * score, 3.0), 10.0, 24.0)) / 2.0
    margin = min(margin_mm, extent_mm / 2.0)
    cx, cy = rng.uniform(margin, extent_mm - margin, size=2)
    aspect = 1.0 + rng.uniform(0.0, 0.4)
    orders = np.arange(2, 8)
    lob_total = 0.03 + 0.30 * m_lob
    weights = rng.dirichlet(np.ones(orders.size)) / orders  # low orders dominate: lobes, not stars
    weights /= weights.sum()
    phases = rng.uniform(0.0, 2 * np.pi, size=orders.size)
    harmonics = tuple(
        (int(k), float(lob_total * w), float(p)) for k, w, p in zip(orders, weights, phases)
    )
    reach = radius * (1.0 + lob_total) * np.sqrt(aspect)  # farthest margin point, mm
    spikes = []
    for _ in range(rng.poisson(12.0 * m_spic**2)):
        length = radius * rng.uniform(0.4, 1.0) * (0.3 + 0.7 * m_spic)
        length = min(length, max(22.0 - reach, 0.0))
        spikes.append((float(rng.uniform(0, 2 * np.pi)), float(length), float(rng.uniform(0.3, 0.8))))
    blobs = []
    for _ in range(rng.poisson(3.0 * m_tex**2)):
        off, ang = radius * rng.uniform(0.0, 0.55), rng.uniform(0, 2 * np.pi)
        blobs.append((
            float(off * np.cos(ang)),
            float(off * np.sin(ang)),
            float(radius * rng.uniform(0.15, 0.3)),
            float(-rng.uniform(40.0, 120.0) * m_tex),
        ))
    return LesionShape(
        center_mm=(float(cx), float(cy)),
        radius_mm=radius,
        aspect=float(aspect),
        angle_rad=float(rng.uniform(0.0, np.pi)),
        harmonics=harmonics,
        spikes=tuple(spikes),
        mean_hu=float(np.clip(rng.normal(40.0, 8.0), 20.0, 60.0)),
        grain_sd_hu=float(4.0 + 30.0 * m_tex),
        blobs=tuple(blobs),
    )


def _margin_radius(shape: LesionShape, phi: np.ndarray) -> np.ndarray:
    """Lobulated margin radius (in the ellipse's normalised frame, mm) at angle ``phi``."""
    r = np.ones_like(phi)
    for k, a, p in shape.harmonics:
        r += a * np.cos(k * phi + p)
    return shape.radius_mm * r


def lesion_alpha(shape: LesionShape, spacing_mm: float, image_size: int) -> np.ndarray:
    """Rasterises the lesion as per-pixel coverage in [0, 1] (partial volume at edges).

    Edges are anti-aliased over one pixel, so thin spicules fade at coarse spacing as on a
    real scanner.

    Args:
        shape: The lesion in mm.
        spacing_mm: In-plane pixel spacing (mm).
        image_size: Rows = columns (px).

    Returns:
        float64 array (image_size, image_size) of lesion coverage.
    """
    alpha_full = np.zeros((image_size, image_size))
    # Only a window around the lesion can be covered: core reach plus the longest spicule.
    lobes = sum(abs(a) for _, a, _ in shape.harmonics)
    longest_spike = max((length for _, length, _ in shape.spikes), default=0.0)
    reach = shape.radius_mm * (1 + lobes) * np.sqrt(shape.aspect) + longest_spike
    (c0, c1), (r0, r1) = (
        (min(max(int((c - reach) / spacing_mm) - 2, 0), image_size),
         min(max(int((c + reach) / spacing_mm) + 3, 0), image_size))
        for c in shape.center_mm
    )
    x, y = pixel_grid_mm(spacing_mm, image_size)
    dx, dy = x[:, c0:c1] - shape.center_mm[0], y[r0:r1] - shape.center_mm[1]
    ca, sa, sq = np.cos(shape.angle_rad), np.sin(shape.angle_rad), np.sqrt(shape.aspect)
    u = (dx * ca + dy * sa) / sq
    v = (-dx * sa + dy * ca) * sq
    alpha = np.clip((_margin_radius(shape, np.arctan2(v, u)) - np.hypot(u, v)) / spacing_mm + 0.5, 0, 1)
    for direction, length, half_width in shape.spikes:
        cd, sd = np.cos(direction), np.sin(direction)
        # Where the spike leaves the margin: margin radius along this direction, in mm.
        ud, vd = (cd * ca + sd * sa) / sq, (-cd * sa + sd * ca) * sq
        base = float(_margin_radius(shape, np.array(np.arctan2(vd, ud))) / np.hypot(ud, vd))
        t = dx * cd + dy * sd  # along the spike
        q = np.abs(-dx * sd + dy * cd)  # across the spike
        hw = half_width * np.clip(1.0 - (t - base) / max(length, 1e-6), 0.0, 1.0)
        inside = (t > base - 1.0) & (t < base + length)
        alpha = np.maximum(alpha, np.where(inside, np.clip((hw - q) / spacing_mm + 0.5, 0, 1), 0.0))
    alpha_full[r0:r1, c0:c1] = alpha
    return alpha_full


def lesion_hu(
    shape: LesionShape, alpha: np.ndarray, spacing_mm: float, rng: np.random.Generator
) -> np.ndarray:
    """Internal lesion HU: granular texture plus dark blobs, re-centred on ``mean_hu``.

    The re-centring over the full-coverage core is what removes any class-dependent mean
    intensity: malignant lesions are more heterogeneous, not darker or brighter on average.

    Returns:
        float64 array like ``alpha``: tissue HU to blend in with weight ``alpha``.
    """
    tissue = np.full(alpha.shape, shape.mean_hu)
    rows, cols = np.flatnonzero(alpha.any(axis=1)), np.flatnonzero(alpha.any(axis=0))
    if rows.size == 0:
        return tissue
    win = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))  # lesion bounding box
    grain = ndimage.gaussian_filter(rng.standard_normal(alpha[win].shape), sigma=0.7 / spacing_mm)
    field = shape.grain_sd_hu * grain / max(float(grain.std()), 1e-9)
    x, y = pixel_grid_mm(spacing_mm, alpha.shape[0])
    x, y = x[:, win[1]], y[win[0]]
    for bx, by, radius, depth in shape.blobs:
        d2 = (x - shape.center_mm[0] - bx) ** 2 + (y - shape.center_mm[1] - by) ** 2
        field = field + depth * np.exp(-d2 / (2.0 * radius**2))
    core = alpha[win] >= 0.999
    if not core.any():
        core = alpha[win] >= alpha.max() * 0.5
    tissue[win] = field + (shape.mean_hu - float(field[core].mean()))
    return tissue


def _draw_tube(alpha: np.ndarray, pts: np.ndarray, radii: np.ndarray, spacing_mm: float) -> None:
    """Adds (pixel-wise max) the coverage of a tapered tube around a polyline to ``alpha``.

    Args:
        alpha: (N, N) coverage image in [0, 1], updated in place.
        pts: (K, 2) centre-line points (x, y) in mm.
        radii: (K,) tube radius at each point (mm), interpolated linearly in between.
        spacing_mm: Pixel spacing (mm).

    Only the tube's bounding box is evaluated, which keeps this cheap.
    """
    size = alpha.shape[0]
    reach = float(radii.max()) + 2 * spacing_mm
    (c0, c1), (r0, r1) = (
        (min(max(int((v.min() - reach) / spacing_mm), 0), size),
         min(max(int((v.max() + reach) / spacing_mm) + 1, 0), size))
        for v in (pts[:, 0], pts[:, 1])
    )
    if c0 >= c1 or r0 >= r1:
        return
    a, e = pts[:-1, :, None, None], (pts[1:] - pts[:-1])[:, :, None, None]  # (K-1, 2, 1, 1)
    x = ((np.arange(c0, c1) + 0.5) * spacing_mm)[None, None, :] - a[:, 0]
    y = ((np.arange(r0, r1) + 0.5) * spacing_mm)[None, :, None] - a[:, 1]
    ex, ey = e[:, 0], e[:, 1]
    t = np.clip((x * ex + y * ey) / np.maximum(ex * ex + ey * ey, 1e-12), 0.0, 1.0)
    r = radii[:-1, None, None] + t * (radii[1:] - radii[:-1])[:, None, None]
    cover = np.clip((r - np.sqrt((x - t * ex) ** 2 + (y - t * ey) ** 2)) / spacing_mm + 0.5, 0, 1).max(axis=0)
    box = alpha[r0:r1, c0:c1]
    np.maximum(box, cover, out=box)


def _curve(rng: np.random.Generator, start: np.ndarray, heading: float, length: float) -> np.ndarray:
    """Gently bent centre line (quadratic Bezier, 13 points, mm) from ``start``."""
    end = start + length * np.array([np.cos(heading), np.sin(heading)])
    bend = rng.normal(0.0, 0.2 * length) * np.array([-np.sin(heading), np.cos(heading)])
    t = np.linspace(0.0, 1.0, 13)[:, None]
    return (1 - t) ** 2 * start + 2 * (1 - t) * t * ((start + end) / 2 + bend) + t**2 * end


def _vessels(rng: np.random.Generator, spacing_mm: float, size: int) -> np.ndarray:
    """Vessel coverage in [0, 1]: tapering, sometimes forking tubes plus in-plane dots.

    Dots are vessels cut across by the slice; they look like tiny nodules, as in real CT.
    """
    extent = spacing_mm * size
    alpha = np.zeros((size, size))
    for _ in range(int(rng.integers(3, 7))):
        start, heading = rng.uniform(0.0, extent, size=2), rng.uniform(0, 2 * np.pi)
        pts = _curve(rng, start, heading, rng.uniform(25.0, 60.0))
        radii = rng.uniform(0.5, 1.3) * np.linspace(1.0, 0.4, len(pts))
        _draw_tube(alpha, pts, radii, spacing_mm)
        if rng.random() < 0.6:  # one branch leaving the parent at a random point
            k = int(rng.integers(3, 9))
            d = pts[k + 1] - pts[k]
            heading = np.arctan2(d[1], d[0]) + rng.choice([-1.0, 1.0]) * rng.uniform(0.35, 0.9)
            sub = _curve(rng, pts[k], heading, rng.uniform(10.0, 30.0))
            _draw_tube(alpha, sub, 0.8 * radii[k] * np.linspace(1.0, 0.5, len(sub)), spacing_mm)
    for _ in range(int(rng.integers(2, 7))):
        centre = np.repeat(rng.uniform(0.0, extent, size=(1, 2)), 2, axis=0)
        _draw_tube(alpha, centre, np.full(2, rng.uniform(0.5, 1.5)), spacing_mm)
    return alpha


def _smooth_noise(rng: np.random.Generator, size: int, sigma_mm: float, spacing_mm: float) -> np.ndarray:
    """Unit-SD Gaussian random field with correlation length ``sigma_mm`` (mm)."""
    field = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma=sigma_mm / spacing_mm)
    return field / max(float(field.std()), 1e-9)


def lung_background(rng: np.random.Generator, spacing_mm: float, size: int) -> np.ndarray:
    """Lesion-free background in HU: lung parenchyma, vessels, maybe a chest wall band.

    Parenchyma is ~-850 HU with soft low-frequency (6 mm) and fine (0.8 mm) texture;
    vessels are soft tissue (30-50 HU); the chest wall (p = 0.5) is a muscle band (~40 HU)
    at one random edge with a gently curved pleural line.

    Args:
        rng: The patient's generator.
        spacing_mm: Pixel spacing (mm).
        size: Image side (px).

    Returns:
        float64 (size, size) HU image.
    """
    x, y = pixel_grid_mm(spacing_mm, size)
    extent = spacing_mm * size
    hu = (-850.0 + rng.normal(0.0, 15.0) + 20.0 * _smooth_noise(rng, size, 6.0, spacing_mm)
          + 8.0 * _smooth_noise(rng, size, 0.8, spacing_mm))
    hu += _vessels(rng, spacing_mm, size) * (rng.uniform(30.0, 50.0) - hu)
    if rng.random() < 0.5:  # chest wall: muscle band at one edge, curved pleural line
        side = int(rng.integers(4))
        dist = np.broadcast_to((x, extent - x, y, extent - y)[side], hu.shape)
        along = np.broadcast_to((y, y, x, x)[side], hu.shape)
        apex, curvature = rng.uniform(0.3, 0.7) * extent, 1.0 / rng.uniform(200.0, 400.0)
        depth = np.minimum(rng.uniform(4.0, 10.0) + 0.5 * curvature * (along - apex) ** 2, 25.0)
        a = np.clip((depth - dist) / spacing_mm + 0.5, 0, 1)
        hu += a * (40.0 + 10.0 * _smooth_noise(rng, size, 1.0, spacing_mm) - hu)
    return hu
