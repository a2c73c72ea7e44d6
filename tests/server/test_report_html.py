"""report.html: self-contained (every image embedded), and it opens in a real headless Chromium."""

import json
import os
import re
import shutil
import subprocess

import pytest

from fedrad.server.report import write_report


def _report():
    site = {"name": "site-x", "n_train": 10, "n_test": 8, "n_skipped": 0, "auc": 0.8, "balanced_accuracy": 0.7,
            "ece": 0.1, "bytes_sent_per_round": 1000, "rounds_trained": 2,
            "history": [{"round": 1, "auc": 0.7, "ece": 0.2, "train_loss": 0.6},
                        {"round": 2, "auc": 0.8, "ece": 0.1, "train_loss": 0.5}],
            "ece_uncorrected": 0.12, "ece_corrected": 0.05, "ece_floor": 0.04, "label_shift_warnings": []}
    return {"strategy": "fedbn, freeze-blocks=14", "rounds": 2, "wall_seconds": 1.0, "full_model_bytes": 10_000,
            "shared_payload_bytes": 900, "config": {}, "sites": [site, {**site, "name": "site-y"}],
            "prior_train": 0.5, "rejected_updates": [], "failed_replies": []}


def test_report_html_embeds_every_plot_and_links_nothing(tmp_path):
    write_report(_report(), tmp_path)
    page = (tmp_path / "report.html").read_text()
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == 2 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r'(href|src)="(https?:)?//', page) and "<script" not in page
    assert "site-x" in page and "<table>" in page
    assert (tmp_path / "report.md").is_file()  # report.md stays


def test_report_html_opens_in_headless_chromium(tmp_path):
    browser = shutil.which("chromium")
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: .ci/run installs Debian's chromium before the tests")
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    write_report(_report(), tmp_path)
    probe = tmp_path / "probe.html"  # the page plus a probe that records, after load, each image's decoded width
    probe.write_text((tmp_path / "report.html").read_text().replace("</body>", (
        "<script>addEventListener('load', () => document.body.setAttribute('data-images', JSON.stringify("
        "[...document.images].map(i => i.complete ? i.naturalWidth : 0))))</script></body>")))
    done = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                           "--v=0", "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    widths = json.loads(re.search(r'data-images="([^"]*)"', done.stdout).group(1).replace("&quot;", '"'))
    assert len(widths) == 2 and all(w > 100 for w in widths)  # every image present and decoded
    assert ":CONSOLE" not in done.stderr, [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
