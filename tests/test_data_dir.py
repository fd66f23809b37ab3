"""Where the outbox lives: ``data-dir`` relative to the configuration file, and ``check``
saying in one line when it cannot hold an outbox."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mail2alert import cli, config
from tests.helpers import tmpfs

MINIMAL = "remote-smtp: localhost:8025\nmanagers: []\n"


@pytest.fixture
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory that is not the configuration's."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.delenv(config.ENV_DATA_DIR, raising=False)
    return cwd


def _file(directory: Path, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "configuration.yml"
    path.write_text(text)
    return path


@pytest.mark.usefixtures("elsewhere")
def test_without_data_dir_the_outbox_is_beside_the_configuration_file(tmp_path: Path) -> None:
    path = _file(tmp_path / "etc", MINIMAL)
    assert config.load(path).data_dir == tmp_path / "etc" / "mail2alert-data"


@pytest.mark.usefixtures("elsewhere")
def test_a_relative_data_dir_is_relative_to_the_configuration_file(tmp_path: Path) -> None:
    path = _file(tmp_path / "etc", MINIMAL + "data-dir: ../var/outbox\n")
    assert config.load(path).data_dir == tmp_path / "etc" / ".." / "var" / "outbox"


def test_a_configuration_named_relative_to_the_working_directory_gives_an_absolute_data_dir(
    elsewhere: Path,
) -> None:
    _file(elsewhere / "conf", MINIMAL)
    loaded = config.load("conf/configuration.yml")
    assert loaded.data_dir == elsewhere / "conf" / "mail2alert-data"
    assert loaded.data_dir.is_absolute()


@pytest.mark.usefixtures("elsewhere")
def test_mail2alert_data_dir_is_the_default_and_the_file_still_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(config.ENV_DATA_DIR, "/var/lib/mail2alert")
    assert config.load(_file(tmp_path / "a", MINIMAL)).data_dir == Path("/var/lib/mail2alert")
    explicit = _file(tmp_path / "b", MINIMAL + "data-dir: /srv/outbox\n")
    assert config.load(explicit).data_dir == Path("/srv/outbox")


@pytest.mark.usefixtures("elsewhere")
def test_a_relative_users_file_is_looked_for_beside_the_configuration(tmp_path: Path) -> None:
    path = _file(
        tmp_path / "etc",
        MINIMAL + "local-smtp:\n  address: localhost:1025\n  auth:\n    users-file: users\n",
    )
    with pytest.raises(config.ConfigError) as raised:
        config.load(path)
    (problem,) = raised.value.problems
    assert f"cannot read 'users' ({tmp_path / 'etc' / 'users'})" in problem.message


@pytest.mark.usefixtures("elsewhere", "restore_logging")
def test_check_says_in_one_line_when_data_dir_is_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "outbox").write_text("not a directory")
    path = _file(tmp_path / "etc", MINIMAL + "data-dir: outbox\n")

    assert cli.main(["check", "--config", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"{path}: data-dir {tmp_path / 'etc' / 'outbox'} is not a directory\n"


@pytest.mark.usefixtures("elsewhere", "restore_logging")
def test_check_says_when_data_dir_cannot_be_made_under_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "plain").write_text("")
    path = _file(tmp_path / "etc", MINIMAL + "data-dir: plain/outbox\n")

    assert cli.main(["check", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [
        f"{path}: data-dir {tmp_path / 'etc' / 'plain' / 'outbox'}"
        f" {tmp_path / 'etc' / 'plain'} is not a directory"
    ]


@pytest.fixture
def read_only(tmp_path: Path) -> Iterator[Path]:
    """A read-only tmpfs at ``tmp_path/ro`` (the tests run as root, for whom a mode bit is no
    obstacle: only a read-only file system is)."""
    with tmpfs(tmp_path / "ro", "ro,size=64k") as disk:
        yield disk


@pytest.mark.usefixtures("elsewhere", "restore_logging")
def test_check_says_in_one_line_when_data_dir_is_read_only(
    tmp_path: Path, read_only: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _file(tmp_path / "etc", MINIMAL + f"data-dir: {read_only}\n")

    assert cli.main(["check", "--config", str(path)]) == 1
    assert capsys.readouterr().err == (
        f"{path}: data-dir {read_only} is not writable (Read-only file system)\n"
    )


@pytest.mark.usefixtures("elsewhere", "restore_logging")
def test_check_accepts_a_data_dir_it_can_make_and_makes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _file(tmp_path / "etc", MINIMAL + "data-dir: new/outbox\n")

    assert cli.main(["check", "--config", str(path)]) == 0
    assert "OK" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "etc").iterdir()) == ["configuration.yml"]
