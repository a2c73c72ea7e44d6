"""Which folders are sites: a data root holds one sub-folder per hospital, each with labels.csv."""

from __future__ import annotations

from pathlib import Path


class NoSitesError(ValueError):
    """The data root holds no site folder."""


def discover_sites(root: Path) -> list[Path]:
    """Sub-folders of `root` that contain a labels.csv, sorted by name (partition i = i-th site)."""
    root = Path(root)
    if not root.is_dir():
        raise NoSitesError(f"Data folder {root} does not exist; give --data a folder with one sub-folder per site "
                           "(or run `fedrad synth --out DIR` to make the built-in synthetic one).")
    sites = sorted(p for p in root.iterdir() if p.is_dir() and (p / "labels.csv").is_file())
    if not sites:
        raise NoSitesError(f"No site folders in {root}: each site is a sub-folder with DICOM files and a "
                           "labels.csv (columns image,label,split[,roi_x,roi_y]).")
    return sites
