"""Every deployment subcommand has --help with an example; provision and --dry-run work from the CLI."""

import pytest

from fedrad.cli import build_parser, main

COMMANDS = ("provision", "coordinator", "register", "site", "submit")


@pytest.mark.parametrize("command", COMMANDS)
def test_help_has_an_example(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([command, "--help"])
    assert exit_.value.code == 0
    assert f"fedrad {command} --" in capsys.readouterr().out


def test_provision_then_dry_runs_print_secure_commands(tmp_path, capsys):
    certs = tmp_path / "certs"
    assert main(["provision", "--certs", str(certs), "--site", "h-a"]) == 0
    assert "created  site h-a" in capsys.readouterr().out
    assert main(["coordinator", "--certs", str(certs), "--state", str(tmp_path / "s"), "--dry-run"]) == 0
    assert "--enable-supernode-auth" in capsys.readouterr().out
    data = tmp_path / "data"
    data.mkdir()
    (data / "labels.csv").write_text("image,label,split\n")
    assert main(["site", "--bundle", str(certs / "sites" / "h-a"), "--data", str(data), "--work", str(tmp_path / "w"),
                 "--dry-run"]) == 0
    assert "--auth-supernode-private-key" in capsys.readouterr().out


def test_errors_exit_2_with_the_reason(tmp_path, capsys):
    assert main(["coordinator", "--certs", str(tmp_path), "--state", str(tmp_path), "--dry-run"]) == 2
    assert "is missing: run `fedrad provision" in " ".join(capsys.readouterr().err.split())
