"""The command line's own manners: help with an example, --version, --log-level anywhere."""

from __future__ import annotations

import logging

import pytest

from mail2alert import __version__, cli


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize("command", sorted(cli.EXAMPLES))
def test_every_commands_help_has_a_one_line_description_and_an_example(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as ended:
        cli.main([command, "--help"])
    assert ended.value.code == 0
    text = capsys.readouterr().out
    description = text.split("\n\n")[1]
    assert description.strip()
    assert "\n" not in description.strip()
    assert text.rstrip().endswith(cli.EXAMPLES[command])
    assert "\nexample:\n  mail2alert " + command in text


def test_every_command_has_an_example() -> None:
    commands = cli.build_parser()._subparsers
    assert commands is not None
    (action,) = commands._group_actions
    assert set(action.choices or ()) == set(cli.EXAMPLES)


@pytest.mark.usefixtures("restore_logging")
def test_version_prints_the_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as ended:
        cli.main(["--version"])
    assert ended.value.code == 0
    assert capsys.readouterr().out == f"mail2alert {__version__}\n"


@pytest.mark.parametrize(
    "argv",
    [
        ["--log-level", "DEBUG", "queue", "list"],
        ["queue", "--log-level", "DEBUG", "list"],
        ["queue", "list", "--log-level", "DEBUG"],
    ],
)
def test_log_level_is_taken_before_or_after_the_command(argv: list[str]) -> None:
    args = cli.build_parser().parse_args(argv)
    assert args.log_level == "DEBUG"


@pytest.mark.usefixtures("restore_logging")
def test_a_log_level_before_the_command_is_kept_when_none_follows_it() -> None:
    args = cli.build_parser().parse_args(["--log-level", "WARNING", "check"])
    assert args.log_level == "WARNING"
    cli.setup_logging(args.log_level)
    assert logging.getLogger().level == logging.WARNING
