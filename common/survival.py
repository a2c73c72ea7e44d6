"""Survival maths both roles share: the Cox partial likelihood and Harrell's concordance as pair counts.

A site trains its 1-output head with the negative Cox partial log-likelihood of its batch
(`cox_loss`, Breslow or Efron ties; checked against lifelines to 1e-6) and evaluates its risk
scores by Harrell's C-index. The C-index travels as *counts* of concordant, discordant and
risk-tied comparable pairs (`pair_counts`, from scikit-survival): those add up across sites, so
the coordinator can pool a federated C-index (`pooled_c_index`) without any risk score, time
or event leaving a site. No Flower here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

TIES = ("breslow", "efron")


def cox_loss(risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor, ties: str = "efron") -> torch.Tensor:
    """Negative Cox partial log-likelihood per event: -(1/d) sum_i in events [eta_i - log risk-set sum].

    Args:
        risk: (N,) log hazard ratios eta (the head's output).
        time: (N,) follow-up times (any unit; only their order matters).
        event: (N,) 1 = event observed, 0 = censored.
        ties: "breslow" (every tied event sees the full risk set) or "efron" (tied events
            leave the risk set gradually: the l-th of d tied events sees R - l/d * D).

    Returns:
        A scalar; 0 when the batch holds no event (nothing to rank against).
    """
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}")
    if not (risk.shape == time.shape == event.shape) or risk.ndim != 1:
        raise ValueError(f"risk, time and event must be 1-D of one length; got {tuple(risk.shape)}, "
                         f"{tuple(time.shape)}, {tuple(event.shape)}")
    order = torch.argsort(time, descending=True, stable=True)
    eta, t, e = risk[order].double(), time[order], event[order].double()
    n_events = e.sum()
    if n_events == 0:
        return risk.sum() * 0.0
    shift = eta.max().detach()
    w = torch.exp(eta - shift)
    _, group, counts = torch.unique_consecutive(t, return_inverse=True, return_counts=True)
    last = torch.cumsum(counts, 0) - 1  # the last row of each tie group in descending time = its full risk set
    at_risk = torch.cumsum(w, 0)[last][group]  # R: sum of exp(eta) over everyone with time >= t_i
    if ties == "breslow":
        log_risk = torch.log(at_risk)
    else:
        tied_w = torch.zeros(len(counts), dtype=w.dtype, device=w.device).index_add(0, group, w * e)[group]  # D
        d = torch.zeros(len(counts), dtype=e.dtype, device=e.device).index_add(0, group, e)[group]
        cum_e = torch.cumsum(e, 0)
        first = last - counts + 1
        before = (cum_e[first] - e[first])[group]  # events of earlier rows outside the group
        rank = cum_e - before - 1  # l = 0 .. d-1 among the group's events
        log_risk = torch.log(at_risk - torch.where(e > 0, rank / d.clamp(min=1), 0.0) * tied_w)
    return -((eta - shift - log_risk) * e).sum() / n_events


@dataclass(frozen=True)
class PairCounts:
    """Harrell's comparable pairs of one site: concordant, discordant, tied in risk (aggregates only)."""

    concordant: int
    discordant: int
    tied_risk: int

    @property
    def comparable(self) -> int:
        return self.concordant + self.discordant + self.tied_risk

    @property
    def c_index(self) -> float:
        """(concordant + tied / 2) / comparable; NaN with no comparable pair."""
        return (self.concordant + 0.5 * self.tied_risk) / self.comparable if self.comparable else float("nan")


def pair_counts(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> PairCounts:
    """Harrell's pair counts of `risk` (higher = earlier event) by scikit-survival's concordance_index_censored."""
    from sksurv.exceptions import NoComparablePairException
    from sksurv.metrics import concordance_index_censored

    event = np.asarray(event).astype(bool)
    if not event.any():
        return PairCounts(0, 0, 0)
    try:
        _, concordant, discordant, tied_risk, _ = concordance_index_censored(event, np.asarray(time, float),
                                                                             np.asarray(risk, float))
    except NoComparablePairException:  # no event, or every event at the latest time
        return PairCounts(0, 0, 0)
    return PairCounts(int(concordant), int(discordant), int(tied_risk))


def pooled_c_index(counts: Iterable[PairCounts]) -> float:
    """The federated C-index: every site's pair counts added up (pairs never span two sites)."""
    counts = list(counts)
    return PairCounts(sum(c.concordant for c in counts), sum(c.discordant for c in counts),
                      sum(c.tied_risk for c in counts)).c_index
