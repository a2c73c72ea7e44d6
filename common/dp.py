"""The privacy cost of a run with differential privacy on the shared update: epsilon at delta.

Each site clips its update of the shared tensors to L2 norm `dp-clip` and adds Gaussian
noise of standard deviation `dp-noise x dp-clip` before it leaves (`fedrad.client.dp_noise`).
The unit is the site's whole contribution in a round (site-level DP), every site takes part
in every round, so the cost is `rounds` compositions of the Gaussian mechanism with noise
multiplier `dp-noise`. Google's `dp-accounting` (Rényi DP accountant) adds them up; both
roles use this one function: the coordinator writes it in the report, a site in its log.

Not covered: BN statistics, histograms, feature moments and metrics are aggregates with a
small-count floor (`fedrad.client.policy`), but no noise is added to them.
"""

from __future__ import annotations

import math


def epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """(epsilon, delta)-DP of `rounds` Gaussian mechanisms with this noise multiplier; inf without noise."""
    if noise_multiplier <= 0 or rounds <= 0:
        return math.inf if rounds > 0 else 0.0
    from dp_accounting import GaussianDpEvent, SelfComposedDpEvent
    from dp_accounting.rdp import RdpAccountant

    accountant = RdpAccountant()
    accountant.compose(SelfComposedDpEvent(GaussianDpEvent(noise_multiplier), rounds))
    return float(accountant.get_epsilon(delta))
