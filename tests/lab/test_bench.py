"""Bench helpers report real, consistent figures (speed itself is never asserted)."""

import json
from argparse import Namespace

import pytest

from fedrad.common.config import RunConfig
from fedrad.common.finetune import shared_keys
from fedrad.common.model import build_model
from fedrad.lab.bench import STRATEGIES, full_model_bytes, reply_bytes


def raw_shared_bytes(cfg: RunConfig) -> int:
    model = build_model(cfg)
    state = model.state_dict()
    return sum(state[k].numel() * state[k].element_size() for k in shared_keys(model, cfg.bn_mode))


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_a_reply_is_its_shared_payload_within_5_percent(name):
    """Within 5 %; for the 10 KB linear probe the fixed framing (metrics, names) is ~1 KB."""
    cfg = RunConfig().replace(**STRATEGIES[name])
    sent, raw = reply_bytes(cfg), raw_shared_bytes(cfg)
    assert raw <= sent <= max(1.05 * raw, raw + 1024)


def test_strategies_order_by_what_they_share():
    sizes = {name: reply_bytes(RunConfig().replace(**knobs)) for name, knobs in STRATEGIES.items()}
    assert sizes["linear-probe"] < 20_000  # 2x1280 weights + 2 biases
    assert sizes["linear-probe"] < sizes["fedbn (freeze-blocks 14, default)"] < sizes["fedbn (freeze-blocks 12)"]
    assert sizes["full fine-tuning, fedbn"] < sizes["fedavg-full (BN shared)"] <= full_model_bytes(RunConfig())


@pytest.mark.slow
def test_gpu_bench_script_runs_on_cpu(tmp_path):
    from fedrad.lab.gpu_bench import main

    args = Namespace(device="cpu", image_size=64, batch_size=8, images=16, freeze_blocks=14, steps=1, out=tmp_path)
    assert main(args) == 0
    results = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert results["device"] == "cpu" and results["train_images_per_second"] > 0
    assert results["bare_fwd_bwd_images_per_second"] > 0 and 0 < results["train_vs_bare"]


def test_cached_and_uncached_epochs_alternate_and_the_figures_agree(tmp_path, monkeypatch):
    """The two kinds of epoch are timed turn about (machine drift must not enter the ratio)."""
    import fedrad.client.train
    from fedrad.lab.bench import epoch_seconds
    from tests.helpers import array_site

    data = array_site(n=8)
    order = []
    real_fit = fedrad.client.train.fit

    def spy(model, inputs, *args, **kwargs):
        order.append("uncached" if inputs.forward is model else "cached")
        return real_fit(model, inputs, *args, **kwargs)

    monkeypatch.setattr(fedrad.client.train, "fit", spy)
    cfg = RunConfig(freeze_blocks=14, batch_size=4, fov_mm=16.0, augment="none")
    figures = epoch_seconds(cfg, data, tmp_path, epochs=3)
    assert order == ["uncached", "cached"] * 4  # one warm-up pair, then three timed pairs
    assert figures["cache_speedup"] == pytest.approx(figures["epoch_seconds_uncached"] / figures["epoch_seconds_cached"])
    assert len(figures["cache_speedup_per_pair"]) == 3
    assert figures["images_per_second"] == pytest.approx(8 / figures["epoch_seconds_cached"])
    assert figures["cache_build_seconds"] > 0
