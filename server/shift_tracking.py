"""FedRadShift: FedRad plus the intensity reference going out and the shift score coming in.

Overrides only `configure_train`, `configure_evaluate` (attach the reference record: the
pooled HU histogram and the shift projection) and `aggregate_evaluate` (read each site's
feature moments and score every site against the pooled moments, per round). The
averaging, validation and bookkeeping stay FedRad's.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from fedrad.common.feature_shift import Moments, shift_scores
from fedrad.common.records import METRICS, MOMENTS, N_FEATURES, REFERENCE, moment_keys
from fedrad.server.strategy import FedRad, site_name

log = logging.getLogger("fedrad.coordinator")


class FedRadShift(FedRad):
    """FedRad that sends the reference with every message and tracks per-round shift scores."""

    def __init__(self, *, broadcast: ArrayRecord | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.broadcast = broadcast
        self.shift: dict[int, dict[str, float]] = {}  # round -> site -> shift score

    def _attach(self, messages: Iterable[Message]) -> list[Message]:
        messages = list(messages)
        if self.broadcast is not None:
            for msg in messages:
                msg.content[REFERENCE] = self.broadcast
        return messages

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self._attach(super().configure_train(server_round, arrays, config, grid))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self._attach(super().configure_evaluate(server_round, arrays, config, grid))

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        found: dict[str, Moments] = {}
        mean_key, cov_key = moment_keys()
        for msg in replies:
            if msg.has_error() or MOMENTS not in msg.content:
                continue
            try:
                record = msg.content[MOMENTS]
                n = int(msg.content[METRICS][N_FEATURES])  # type: ignore[index]
                found[site_name(msg)] = Moments(n, record[mean_key].numpy().astype(np.float64),  # type: ignore
                                                record[cov_key].numpy().astype(np.float64))  # type: ignore
            except (KeyError, ValueError, TypeError) as err:
                log.warning("round %d: site %s sent unusable feature moments: %s", server_round, site_name(msg), err)
        if found:
            self.shift[server_round] = shift_scores(found)
            log.info("round %d · shift score: %s", server_round,
                     " · ".join(f"{k} {v:.3g}" for k, v in sorted(self.shift[server_round].items())))
        return super().aggregate_evaluate(server_round, replies)
