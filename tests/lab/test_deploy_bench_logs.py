"""`fedrad bench --deploy` reads where a message's time went from the warm sites' own log lines."""

from fedrad.lab.deploy_bench import message_times


def test_message_times_are_medians_per_message_type(tmp_path):
    (tmp_path / "site-a").mkdir()
    (tmp_path / "site-a" / "site.log").write_text(
        "12:00 INFO fedrad.site: train message: pull 1.50 s, ClientApp 0.40 s, push 0.10 s\n"
        "12:01 INFO fedrad.site: evaluate message: pull 2.00 s (header 0.10 s, arrays 1.80 s, app 0.10 s), "
        "ClientApp 0.20 s, push 0.05 s\n")
    (tmp_path / "site-b.log").write_text("train message: pull 1.70 s, ClientApp 0.60 s, push 0.30 s\n"
                                         "train message: pull 9.00 s, ClientApp 0.50 s, push 0.20 s\n")
    times = message_times(tmp_path)
    assert times["deploy_train_message_median_seconds"] == {"pull": 1.7, "clientapp": 0.5, "push": 0.2,
                                                            "messages": 3}
    assert times["deploy_evaluate_message_median_seconds"] == {"pull": 2.0, "pull_header": 0.1, "pull_arrays": 1.8,
                                                               "pull_app": 0.1, "clientapp": 0.2, "push": 0.05,
                                                               "messages": 1}
    assert message_times(tmp_path / "absent") == {}
