"""fedrad compare --resume: a finished job is reused only for exactly its config."""


def test_resume_reuses_a_finished_job_only_for_the_same_config(tmp_path, monkeypatch):
    import fedrad.lab.compare as compare_module
    from fedrad.lab.compare_plan import Job

    calls = []

    def fake_run(job):
        calls.append(job.name)
        return {"kind": job.kind, "name": job.name, "seed": job.seed, "auc": len(calls)}

    monkeypatch.setattr(compare_module, "run_job", fake_run)
    job = Job("federated", "fedbn", 0, {"lr-max": 0.003}, str(tmp_path / "fedbn"))
    first = compare_module.run_or_reuse(job, resume=True)  # nothing there yet: it runs
    assert compare_module.run_or_reuse(job, resume=True) == first and calls == ["fedbn"]
    assert compare_module.run_or_reuse(job, resume=False)["auc"] == 2  # without --resume: run again
    other = Job("federated", "fedbn", 0, {"lr-max": 0.01}, str(tmp_path / "fedbn"))
    assert compare_module.run_or_reuse(other, resume=True)["auc"] == 3  # another rate: not the same job


def test_the_report_of_a_compare_at_an_earlier_compares_rates_names_them():
    from fedrad.lab.compare_report import to_markdown

    summary = {"runs": [], "seeds": [0], "leave_one_out": [], "gaps": [], "sites": [], "rounds": 5, "local_epochs": 2,
               "freeze_blocks": 14, "engine": "flower", "data_dir": "d", "wall_seconds": 1.0, "smallest_site": "a",
               "bn_shift_scores": {}, "bn_shift_source": "fedbn", "most_shifted_sites": [], "scanners": [],
               "loso_bn_mode": "silobn", "lr_tuning": {"lr_from": {"fedbn": 0.01, "pooled": 0.0003}}}
    text = to_markdown(summary)  # an --lr-from compare's summary has no grid: it crashed here after every run
    assert "not tuned on this data): fedbn 0.01, pooled 0.0003." in text
