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
