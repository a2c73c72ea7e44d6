"""End to end in Flower's Simulation Engine: a site's error text never reaches anything the coordinator writes.

One site's labels.csv has no header, so its "header" is a data row: a file name that carries a
patient's name and record number, and a label. Before, that row reached the coordinator's
report inside the exception text. Now the site replies with a code; the run goes on with the
other sites; the text stays in the site's own incidents.log.
"""

import json
import logging

import pytest

from fedrad.common.config import RunConfig
from fedrad.lab.simulate import simulate
from fedrad.lab.synth import SiteSpec, generate
from tests.helpers import small_site_policy

pytestmark = pytest.mark.slow
SECRET = "doe_john_mrn12345"


def test_a_header_less_labels_csv_leaves_no_trace_at_the_coordinator(tmp_path, caplog):
    data = tmp_path / "data"
    generate(data, sites=[SiteSpec(name=f"h{i}", n_patients=20, prevalence=0.5, spacing_mm=s, noise_hu=10,
                                   kernel="smooth", hu_offset=0, manufacturer="GE")
                          for i, s in enumerate((0.7, 0.8, 0.9))], seed=4, image_size=96)
    small_site_policy(data)
    (data / "h2" / "labels.csv").write_text(f"images/{SECRET}.dcm,1,train\nimages/other.dcm,0,test\n")
    out, sites = tmp_path / "out", tmp_path / "site-disks"  # the coordinator's folder; the sites' own disks
    cfg = RunConfig(num_server_rounds=1, local_epochs=1, batch_size=8, fov_mm=32.0, shift_dim=4,
                    data_dir=str(data), out_dir=str(out), work_dir=str(sites))
    with caplog.at_level(logging.INFO):
        report = simulate(cfg, num_cpus=2)
    assert {s["name"] for s in report["sites"]} == {"h0", "h1"}  # the run went on without h2
    failed = report["failed_replies"]
    assert failed and all(f["reason"].startswith("site-data (incident ") for f in failed)
    # nothing the coordinator wrote or logged holds the file name or the row
    written = [p for p in out.rglob("*") if p.is_file()]
    assert {p.name for p in written} >= {"report.json", "report.md", "global.npz", "global.json", "checkpoint.npz"}
    for path in written:
        assert SECRET.encode() not in path.read_bytes(), path
        assert b"1,train" not in path.read_bytes(), path
    assert SECRET not in caplog.text and "labels.csv" not in json.dumps(report)
    # ... while the site kept the full text, under the incident ids the coordinator got
    incidents = (sites / "h2" / "incidents.log").read_text()
    assert SECRET in incidents
    for f in failed:
        assert f"incident {f['reason'].split('incident ')[1].rstrip(')')}" in incidents
