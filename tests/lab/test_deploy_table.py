"""`fedrad deploy-table`: grouping by draw, mean ± sd, and issue 16's checks judged in and out of scope."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedrad.cli import main
from fedrad.lab.deploy_table import Checks, checks_summary, deploy_table, load_site_runs, mean_sd


def _site(name: str, *, ece_em: float, ece_lab: float, prior_em: float, true: float, labelled: float,
          n_unlabelled: int = 325) -> dict:
    site = {"name": name, "n_deploy_eval": 300.0, "n_unlabelled": n_unlabelled, "prior_labelled": labelled,
            "prior_deploy_true": true}
    for method, prior, ece in (("none", 0.6, 0.08), ("labelled", labelled, ece_lab), ("em", prior_em, ece_em),
                               ("bbse", prior_em, ece_em), ("oracle", true, 0.04)):
        site.update({f"prior_deploy_{method}": prior, f"ece_deploy_{method}": ece, f"brier_deploy_{method}": 0.12,
                     f"balanced_accuracy_deploy_{method}": 0.83})
    return site


def _run(tmp: Path, name: str, data: str, seed: int, sites: list[dict]) -> Path:
    run = tmp / name
    run.mkdir()
    plain = {"name": "site-c", "n_unlabelled": 0}  # no deployment evaluation: never listed
    (run / "report.json").write_text(json.dumps({"config": {"data-dir": f"/x/{data}", "seed": seed},
                                                 "sites": [*sites, plain]}))
    return run


@pytest.fixture
def runs(tmp_path: Path) -> list[Path]:
    return [
        _run(tmp_path, "r0", "draw0", 0, [_site("site-a", ece_em=0.04, ece_lab=0.10, prior_em=0.59, true=0.6,
                                                labelled=0.3)]),
        _run(tmp_path, "r1", "draw0", 1, [_site("site-a", ece_em=0.06, ece_lab=0.10, prior_em=0.52, true=0.6,
                                                labelled=0.3)]),
        # priors 0.1 apart and only 200 unlabelled images: both checks out of scope
        _run(tmp_path, "r2", "draw1", 0, [_site("site-a", ece_em=0.09, ece_lab=0.10, prior_em=0.2, true=0.6,
                                                labelled=0.5, n_unlabelled=200)]),
    ]


def test_groups_and_mean_sd(runs: list[Path]) -> None:
    rows = load_site_runs(runs)
    assert [(r.draw, r.site, r.seed) for r in rows] == [("draw0", "site-a", 0), ("draw0", "site-a", 1),
                                                        ("draw1", "site-a", 0)]
    assert rows[0].ratio == pytest.approx(0.4) and rows[1].ratio == pytest.approx(0.6)
    assert rows[1].em_error == pytest.approx(0.08)
    m, sd, n = mean_sd([r.ratio for r in rows[:2]])
    assert (m, n) == (pytest.approx(0.5), 2) and sd == pytest.approx(0.1414, abs=1e-4)
    assert mean_sd([None]) is None


def test_checks_judge_only_in_scope(runs: list[Path]) -> None:
    summary = checks_summary(load_site_runs(runs), Checks())
    # draw1 is out of both scopes: 2 judged per check, seed 1 of draw0 fails both
    assert summary["em_prior"]["judged"] == 2 and summary["em_prior"]["met"] == 1
    assert summary["ece_ratio"]["judged"] == 2 and summary["ece_ratio"]["met"] == 1
    fail = summary["ece_ratio"]["failed"][0]
    assert (fail["draw"], fail["seed"]) == ("draw0", 1) and fail["value"] == pytest.approx(0.6)
    looser = checks_summary(load_site_runs(runs), Checks(max_ratio=0.7, max_prior_error=0.1))
    assert looser["ece_ratio"]["met"] == 2 and looser["em_prior"]["met"] == 2


def test_markdown_has_five_rows_per_site_and_the_failure(runs: list[Path]) -> None:
    md, data = deploy_table(runs)
    assert sum(line.startswith("| draw0 | site-a") for line in md.splitlines()) == 5 + 2  # summary rows + per-run rows
    assert "fails draw0 site-a seed 1 (0.60)" in md
    assert "site-c" not in md
    assert len(data["site_runs"]) == 3


def test_cli_writes_json(runs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "t.json"
    assert main(["deploy-table", *map(str, runs), "--json", str(out), "--max-ratio", "0.7"]) == 0
    assert json.loads(out.read_text())["checks"]["ece_ratio"]["met"] == 2
    assert "EM" in capsys.readouterr().out


def test_no_deployment_sites_is_an_error(tmp_path: Path) -> None:
    run = _run(tmp_path, "r", "d", 0, [])
    with pytest.raises(ValueError, match="deployment evaluation"):
        deploy_table([run])
