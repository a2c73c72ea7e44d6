"""Cox partial likelihood and Harrell's pair counts, checked against lifelines."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from lifelines import CoxPHFitter
from lifelines.utils import concordance_index

from fedrad.common.survival import PairCounts, cox_loss, pair_counts, pooled_c_index


def _data(seed: int, n: int = 90, tied: bool = True) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 2))
    t = rng.exponential(10, n) * np.exp(-0.8 * x[:, 0])
    t = np.round(t) + 1 if tied else t + 0.01
    return pd.DataFrame({"x0": x[:, 0], "x1": x[:, 1], "t": t, "e": (rng.random(n) < 0.7).astype(float)})


def _loss(df: pd.DataFrame, beta: np.ndarray, ties: str) -> float:
    eta = torch.tensor(df[["x0", "x1"]].to_numpy() @ beta)
    return float(cox_loss(eta, torch.tensor(df["t"].to_numpy()), torch.tensor(df["e"].to_numpy()), ties))


@pytest.mark.parametrize("seed", [0, 1])
def test_efron_matches_lifelines_partial_likelihood_with_ties(seed: int) -> None:
    df = _data(seed)
    assert df["t"].duplicated().any()  # ties present: Efron differs from Breslow here
    fit = CoxPHFitter().fit(df, "t", "e")
    ours = _loss(df, fit.params_.to_numpy(), "efron") * df["e"].sum()
    assert ours == pytest.approx(-fit.log_likelihood_, abs=1e-6)
    assert _loss(df, fit.params_.to_numpy(), "breslow") != pytest.approx(ours / df["e"].sum(), abs=1e-6)


def test_breslow_equals_lifelines_without_ties() -> None:
    df = _data(2, tied=False)
    fit = CoxPHFitter().fit(df, "t", "e")
    assert _loss(df, fit.params_.to_numpy(), "breslow") * df["e"].sum() == pytest.approx(-fit.log_likelihood_,
                                                                                            abs=1e-6)


def test_loss_is_minimised_at_lifelines_coefficients() -> None:
    df = _data(3)
    beta = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    x, t, e = (torch.tensor(df[c].to_numpy()) for c in (["x0", "x1"], "t", "e"))
    opt = torch.optim.LBFGS([beta], max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = cox_loss(x @ beta, t, e, "efron")
        loss.backward()
        return loss

    opt.step(closure)
    np.testing.assert_allclose(beta.detach().numpy(), CoxPHFitter().fit(df, "t", "e").params_.to_numpy(), atol=1e-4)


def test_no_event_gives_zero_loss_and_bad_ties_are_refused() -> None:
    z = torch.zeros(3, dtype=torch.float64)
    assert float(cox_loss(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 2.0, 3.0]), z)) == 0.0
    with pytest.raises(ValueError, match="ties must be one of"):
        cox_loss(z, z, z, "exact")


@pytest.mark.parametrize("tied", [True, False])
def test_pair_counts_give_lifelines_c_index(tied: bool) -> None:
    df = _data(4, tied=tied)
    risk = np.random.default_rng(5).normal(size=len(df)) - df["x0"].to_numpy()
    counts = pair_counts(df["t"].to_numpy(), df["e"].to_numpy(), risk)
    assert counts.c_index == pytest.approx(concordance_index(df["t"], -risk, df["e"]), abs=1e-9)


def test_pooled_c_index_adds_counts_not_indices() -> None:
    a, b = PairCounts(90, 10, 0), PairCounts(1, 9, 2)
    assert pooled_c_index([a, b]) == pytest.approx((90 + 1 + 1) / 112)
    assert pooled_c_index([a, b]) != pytest.approx((a.c_index + b.c_index) / 2)
    assert pair_counts(np.array([1.0, 2.0]), np.array([0, 0]), np.array([0.1, 0.2])) == PairCounts(0, 0, 0)
