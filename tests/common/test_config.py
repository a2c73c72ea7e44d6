"""One configuration path: pyproject's run config <-> RunConfig, checked by name, type and range."""

import pytest

from fedrad.common.config import RunConfig, project_run_config


def test_pyproject_run_config_mirrors_the_dataclass_defaults():
    assert project_run_config() == RunConfig().to_run_config()


def test_round_trip_and_overrides():
    cfg = RunConfig.from_run_config({"freeze-blocks": 12, "lr-max": 1, "bn-mode": "shared"})
    assert (cfg.freeze_blocks, cfg.lr_max, cfg.bn_mode) == (12, 1.0, "shared")
    assert RunConfig.from_run_config(cfg.to_run_config()) == cfg
    assert RunConfig().image_size == 96


@pytest.mark.parametrize("values, error, match", [
    ({"lr-mx": 1.0}, ValueError, "Unknown run-config key"),
    ({"freeze-blocks": "12"}, TypeError, "'freeze-blocks' must be int"),
    ({"freeze-blocks": 1.5}, TypeError, "'freeze-blocks' must be int"),
    ({"freeze-blocks": 40}, ValueError, "freeze-blocks must be between"),
    ({"bn-mode": "silly"}, ValueError, "bn-mode must be one of"),
    ({"batch-size": 1}, ValueError, "batch-size must be >= 2"),
    ({"lr-decay": 0.0}, ValueError, "lr-decay must be in"),
    ({"rejoin-wait": -1.0}, ValueError, "rejoin-wait must be >= 0"),
])
def test_bad_values_are_refused_by_name(values, error, match):
    with pytest.raises(error, match=match):
        RunConfig.from_run_config(values)
