"""Why a site's label-shift correction fell back, as bits that may travel (a scalar, not text).

A site's reply may carry only scalar metrics (`fedrad.common.egress`), so the reasons a site
did not correct its posteriors travel as one integer of flags; the site logs the full
wording locally and the coordinator's report turns the flags back into sentences that
name the site. The FALLBACK flags mean the safe fallback: the site's "corrected" posteriors
are the global model's own, unchanged.
"""

from __future__ import annotations

from enum import IntFlag


class ShiftFlag(IntFlag):
    """Bits of the `label-shift-flags` metric."""

    NONE = 0
    NO_TRAIN_PRIOR = 1  # the coordinator sent no training prior: the site's labelled prior stood in
    CLASS_ABSENT = 2  # a class is missing from the site's labelled test images: nothing to calibrate on
    FEW_CALIBRATION = 4  # too few held-out labelled images to calibrate (BCTS)
    FEW_UNLABELLED = 8  # too few unlabelled images for EM: the site's labelled prior stands in
    EM_FAILED = 16  # EM did not converge
    BBSE_FAILED = 32  # BBSE refused: |TPR - FPR| < 0.1 or a class absent (only the second estimate is missing)
    NOT_PERSONALISED = 64  # the decision layer could not be personalised (one class only)


FALLBACK = ShiftFlag.CLASS_ABSENT | ShiftFlag.FEW_CALIBRATION | ShiftFlag.EM_FAILED
INFO = ShiftFlag.FEW_UNLABELLED  # not a warning: the expected case for a site without deployment images

MESSAGES = {
    ShiftFlag.NO_TRAIN_PRIOR: "the coordinator sent no training prior; the site's own labelled prior was used as the "
                              "reference",
    ShiftFlag.CLASS_ABSENT: "a class is absent from its labelled test images, so nothing can be calibrated",
    ShiftFlag.FEW_CALIBRATION: "too few labelled test images to calibrate (BCTS needs 10 per fold, 2 of each "
                               "class)",
    ShiftFlag.FEW_UNLABELLED: "too few unlabelled images for EM; its prior comes from its labelled counts",
    ShiftFlag.EM_FAILED: "EM did not converge",
    ShiftFlag.BBSE_FAILED: "BBSE refused: on a fold of its labelled test images the predictions barely separate "
                           "the classes (|TPR − FPR| < 0.1) or a class is absent, so its confusion matrix is "
                           "not inverted (no second estimate)",
    ShiftFlag.NOT_PERSONALISED: "its decision layer was not personalised (its labels hold one class only)",
}


def describe(flags: int, site: str, *, include_info: bool = False) -> list[str]:
    """One sentence per raised warning flag (and informational ones if asked), naming the site."""
    out = []
    for flag, text in MESSAGES.items():
        if int(flags) & flag and (include_info or not flag & INFO):
            then = " No label-shift correction: its posteriors are the global model's." if flag & FALLBACK else ""
            out.append(f"site {site}: {text}.{then}")
    return out
