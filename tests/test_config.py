"""mail2alert.config and `mail2alert check`: validate, report every problem with file:line."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping
from pathlib import Path

import pytest

from mail2alert import cli, config
from mail2alert.config import Config
from mail2alert.errors import ConfigError
from mail2alert.model import Secret
from mail2alert.settings import Delivery, HostPort

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "configuration.yml"


def parse(text: str, env: Mapping[str, str] | None = None) -> Config:
    """Parse dedented YAML as ``configuration.yml``; line 1 is the first line of ``text``."""
    return config.parse(textwrap.dedent(text), "configuration.yml", env or {})


def problems(text: str, env: Mapping[str, str] | None = None) -> list[str]:
    """Every problem reported for ``text``, as the operator reads them."""
    with pytest.raises(ConfigError) as caught:
        parse(text, env)
    return [str(p) for p in caught.value.problems]


# -- what loads ---------------------------------------------------------------------------------


def test_the_example_from_the_original_readme_loads_unchanged() -> None:
    loaded = config.load(EXAMPLE)

    assert loaded.local_smtp == HostPort("localhost", 1025)
    assert loaded.remote_smtp == HostPort("localhost", 8025)
    assert [m.manager.type.name for m in loaded.managers] == ["gocd", "mail"]


def test_the_example_gocd_manager_has_its_wants_rules_and_options() -> None:
    gocd = config.load(EXAMPLE).managers[0]

    assert gocd.manager.wants_to == ("mail2alert@example.com",)
    assert gocd.manager.wants_from == ()
    assert gocd.options["url"] == "http://localhost:8080/go"
    assert gocd.options["user"] == "olle"
    assert gocd.options["passwd"] == Secret("pelle")
    assert [r.function.name for r in gocd.manager.rules] == [
        "pipelines.in_group",
        "pipelines.name_like_in_group",
    ]
    assert [r.events for r in gocd.manager.rules] == [
        frozenset({"BREAKS"}),
        frozenset({"BREAKS", "FIXED"}),
    ]
    assert gocd.manager.rules[1].args == ("(.+)-release.*", "my-group")
    assert gocd.manager.rules[1].actions == ("mailto:cat@example.com",)


def test_the_example_mail_manager_has_its_wants_and_rule() -> None:
    mail = config.load(EXAMPLE).managers[1].manager

    assert mail.wants_from == ("go@example.com",)
    assert mail.wants_to == ()
    (rule,) = mail.rules
    assert rule.function.name == "mail.in_subject"
    assert rule.args == ("server", "backup")
    assert rule.actions == ("mailto:sys@example.com", "mailto:op@example.com")
    assert rule.events is None


def test_optional_settings_have_their_defaults() -> None:
    loaded = config.load(EXAMPLE)

    assert loaded.data_dir == EXAMPLE.parent / "mail2alert-data"
    assert loaded.delivery == Delivery(retry_initial=60, retry_max=3600, give_up_after=5 * 86400)


def test_local_smtp_defaults_to_localhost_1025() -> None:
    loaded = parse(
        """\
        remote-smtp: localhost:8025
        managers: []
        """
    )

    assert loaded.local_smtp == HostPort("localhost", 1025)


def test_an_ipv6_address_is_written_in_brackets_and_quoted() -> None:
    loaded = parse(
        """\
        local-smtp: "[::1]:1025"
        remote-smtp: "[2001:db8::25]:25"
        managers: []
        """
    )

    assert loaded.local_smtp == HostPort("::1", 1025)
    assert loaded.remote_smtp == HostPort("2001:db8::25", 25)
    assert str(loaded.local_smtp) == "[::1]:1025"


def test_data_dir_and_delivery_can_be_set() -> None:
    loaded = parse(
        """\
        remote-smtp: localhost:8025
        managers: []
        data-dir: /var/lib/mail2alert
        delivery:
          retry-initial: 30s
          retry-max: 10m
          give-up-after: 2d
        """
    )

    assert loaded.data_dir == Path("/var/lib/mail2alert")
    assert loaded.delivery == Delivery(retry_initial=30, retry_max=600, give_up_after=2 * 86400)


def test_the_documented_delivery_defaults_are_the_defaults() -> None:
    loaded = parse(
        """\
        remote-smtp: localhost:8025
        managers: []
        delivery: {retry-initial: 1m, retry-max: 1h, give-up-after: 5d}
        """
    )

    assert loaded.delivery == Delivery()


@pytest.mark.parametrize(
    ("written", "seconds"),
    [("30s", 30), ("10m", 600), ("1h", 3600), ("5d", 432_000), ("90", 90), ("1.5h", 5400)],
)
def test_durations_take_a_unit_or_plain_seconds(written: str, seconds: float) -> None:
    loaded = parse(
        f"""\
        remote-smtp: localhost:8025
        managers: []
        delivery:
          give-up-after: {written}
        """
    )

    assert loaded.delivery.give_up_after == seconds


def test_messages_we_want_takes_one_address_or_a_list_lower_cased() -> None:
    loaded = parse(
        """\
        remote-smtp: localhost:8025
        managers:
          - name: mail
            messages-we-want:
              to: Alerts@Example.com
          - name: mail
            messages-we-want:
              from:
                - GO@example.com
                - ci@example.com
        """
    )

    first, second = (m.manager for m in loaded.managers)
    assert first.wants_to == ("alerts@example.com",)
    assert second.wants_from == ("go@example.com", "ci@example.com")


def test_the_event_alias_from_the_original_readme_works() -> None:
    loaded = parse(
        """\
        remote-smtp: localhost:8025
        managers:
          - name: gocd
            messages-we-want:
              to: mail2alert@example.com
            rules:
              - actions:
                  - mailto:cat@example.com
                filter:
                  event: breaks
                  function: pipelines.any
        """
    )

    assert loaded.managers[0].manager.rules[0].events == frozenset({"BREAKS"})


def test_environment_variables_are_replaced_in_string_values() -> None:
    loaded = parse(
        """\
        remote-smtp: ${SMTP_HOST}:$SMTP_PORT
        managers:
          - name: gocd
            url: http://localhost:8080/go
            user: $GOUSER
            messages-we-want:
              to: mail2alert@example.com
        """,
        {"SMTP_HOST": "mx.example.com", "SMTP_PORT": "25", "GOUSER": "olle"},
    )

    assert loaded.remote_smtp == HostPort("mx.example.com", 25)
    assert loaded.managers[0].options["user"] == "olle"


def test_a_double_dollar_is_a_literal_dollar() -> None:
    loaded = parse(
        """\
        remote-smtp: localhost:8025
        managers:
          - name: gocd
            url: http://localhost:8080/go
            passwd: pa$$word$$
            messages-we-want:
              to: mail2alert@example.com
        """
    )

    passwd = loaded.managers[0].options["passwd"]
    assert isinstance(passwd, Secret)
    assert passwd.reveal() == "pa$word$"


def test_a_password_from_the_environment_never_shows_in_str_or_repr() -> None:
    loaded = parse(
        """\
        remote-smtp: localhost:8025
        managers:
          - name: gocd
            url: http://localhost:8080/go
            user: olle
            passwd: $GOPASS
            token: ${GOTOKEN}
            messages-we-want:
              to: mail2alert@example.com
        """,
        {"GOPASS": "s3cret-pa55", "GOTOKEN": "t0ken-abc"},
    )

    for shown in (str(loaded), repr(loaded), str(loaded.managers), repr(loaded.managers[0])):
        assert "s3cret-pa55" not in shown
        assert "t0ken-abc" not in shown
    passwd = loaded.managers[0].options["passwd"]
    assert isinstance(passwd, Secret)
    assert passwd.reveal() == "s3cret-pa55"


# -- one test per class of problem ----------------------------------------------------------------


def test_a_yaml_syntax_error_is_reported_with_its_line() -> None:
    assert problems(
        """\
        remote-smtp: localhost:8025
        managers:
          - name: "mail
        """
    ) == [
        "configuration.yml:3: a quoted value starts on this line and is never closed",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "remote-smtp: x\nmanagers:\n  - name: gocd\n     url: x\n",
            "configuration.yml:4: this line is indented more than the key above it expects",
        ),
        (
            "remote-smtp: x\n  managers: []\n",
            "configuration.yml:2: this line is indented more than the key above it expects",
        ),
        (
            "managers:\n  - name: gocd\n    url: x\n   user: y\n",
            "configuration.yml:4: this line is indented differently from the lines it belongs"
            " with: line it up with the key or list item it continues",
        ),
        (
            "managers:\n  - name: a\n    rules:\n      - actions: [x]\n     - actions: [y]\n",
            "configuration.yml:5: this line is indented differently from the lines it belongs"
            " with: line it up with the key or list item it continues",
        ),
        (
            "managers:\n\t- name: x\n",
            "configuration.yml:2: a tab in the indentation: YAML indents with spaces only",
        ),
        (
            "managers: [a, b\nremote-smtp: x\n",
            "configuration.yml:1: a [ opened on this line is not closed where it should be",
        ),
        (
            "remote-smtp: a: b\n",
            'configuration.yml:1: a value with ": " in it must be quoted ("like: this")',
        ),
    ],
    ids=[
        "key-under-a-list-items-key",
        "key-under-a-value",
        "less-than-its-siblings",
        "list-item-off-by-one",
        "tab",
        "unclosed-bracket",
        "colon-in-a-value",
    ],
)
def test_a_yaml_mistake_is_said_in_words_at_the_line_to_fix(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config.parse(text, "configuration.yml", {})
    assert [str(p) for p in caught.value.problems] == [expected]


def test_an_unquoted_ipv6_address_is_a_yaml_error_with_a_hint() -> None:
    assert problems(
        """\
        local-smtp: [::1]:1025
        remote-smtp: localhost:8025
        managers: []
        """
    ) == [
        "configuration.yml:1: YAML syntax error: expected the node content, but found ':'"
        ' (quote IPv6 addresses: "[::1]:1025")',
    ]


def test_yaml_nested_thousands_of_levels_deep_is_a_problem_at_its_line_not_a_crash() -> None:
    """Found by tests/test_fuzz.py: "[" * 5000 raised RecursionError out of PyYAML."""
    deep = "remote-smtp: localhost:8025\nmanagers: " + "[" * 5000

    assert problems(deep) == ["configuration.yml:2: nested more than 100 levels deep"]


def test_an_unknown_key_is_reported_with_a_suggestion() -> None:
    assert problems(
        """\
        remote-smtp: localhost:8025
        managers:
          - name: gocd
            url: http://localhost:8080/go
            pasword: pelle
            messages-we-want:
              to: mail2alert@example.com
        """
    ) == [
        "configuration.yml:5: managers[0].pasword: unknown key 'pasword' for a gocd manager"
        " (did you mean 'passwd'?)",
    ]


def test_a_missing_required_key_is_reported_where_it_belongs() -> None:
    assert problems(
        """\
        remote-smtp: localhost:8025
        managers:
          - name: mail
            messages-we-want:
              to: mail2alert@example.com
            rules:
              - actions:
                  - mailto:ops@example.com
        """
    ) == [
        "configuration.yml:7: managers[0].rules[0]: missing required key 'filter'",
    ]


def test_a_missing_top_level_key_is_reported_at_the_top() -> None:
    assert problems(
        """\
        local-smtp: localhost:1025
        managers: []
        """
    ) == [
        "configuration.yml:1: missing required key 'remote-smtp'",
    ]


def test_a_value_of_the_wrong_type_is_reported() -> None:
    assert problems(
        """\
        remote-smtp: localhost:8025
        managers:
          - name: mail
            messages-we-want:
              to: mail2alert@example.com
            rules:
              - actions:
                  - mailto:ops@example.com
                filter:
                  function: mail.in_subject
                  args: backup
        """
    ) == [
        "configuration.yml:11: managers[0].rules[0].filter.args: expected a list,"
        " got text 'backup'",
    ]


def test_an_unknown_manager_name_is_reported_with_a_suggestion() -> None:
    assert problems(
        """\
        remote-smtp: localhost:8025
        managers:
          - name: gocdd
            messages-we-want:
              to: mail2alert@example.com
        """
    ) == [
        "configuration.yml:3: managers[0].name: unknown manager 'gocdd' (did you mean 'gocd'?)"
        " (known: gocd, mail)",
    ]


def test_an_unknown_function_is_reported_with_a_suggestion() -> None:
    assert problems(
        """\
        remote-smtp: localhost:8025
        managers:
          - name: gocd
            url: http://localhost:8080/go
            messages-we-want:
              to: mail2alert@example.com
            rules:
              - actions:
                  - mailto:cat@example.com
                filter:
                  function: pipelines.in_grup
                  args:
                    - my-group
        """
    ) == [
        "configuration.yml:11: managers[0].rules[0].filter.function: unknown function"
        " 'pipelines.in_grup' for the gocd manager (did you mean 'pipelines.in_group'?)",
    ]


def test_a_function_of_another_manager_is_unknown_and_the_known_ones_are_listed() -> None:
    assert problems(
        """\
        remote-smtp: localhost:8025
        managers:
          - name: mail
            messages-we-want:
              from: go@example.com
            rules:
              - actions:
                  - mailto:cat@example.com
                filter:
                  function: pipelines.any
        """
    ) == [
        "configuration.yml:10: managers[0].rules[0].filter.function: unknown function"
        " 'pipelines.any' for the mail manager (known: mail.in_subject)",
    ]


def test_a_wrong_number_of_args_is_reported_with_the_signature() -> None:
    assert problems(
        """\
        remote-smtp: localhost:8025
        managers:
          - name: gocd
            url: http://localhost:8080/go
            messages-we-want:
              to: mail2alert@example.com
            rules:
              - actions:
                  - mailto:cat@example.com
                filter:
                  function: pipelines.in_group
                  args:
                    - my-group
                    - other-group
        """
    ) == [
        "configuration.yml:13: managers[0].rules[0].filter.args: pipelines.in_group(group)"
        " takes 1 argument, got 2",
    ]


def test_an_invalid_regex_is_reported_at_its_argument() -> None:
    assert problems(
        """\
        remote-smtp: localhost:8025
        managers:
          - name: gocd
            url: http://localhost:8080/go
            messages-we-want:
              to: mail2alert@example.com
            rules:
              - actions:
                  - mailto:cat@example.com
                filter:
                  function: pipelines.name_like_in_group
                  args:
                    - (.+-release
                    - my-group
        """
    ) == [
        "configuration.yml:13: managers[0].rules[0].filter.args[0]: invalid regular expression"
        " '(.+-release': missing ), unterminated subpattern at position 0",
    ]


def test_a_regex_without_a_group_is_reported_for_name_like_in_group() -> None:
    assert problems(
        """\
        remote-smtp: localhost:8025
        managers:
          - name: gocd
            url: http://localhost:8080/go
            messages-we-want:
              to: mail2alert@example.com
            rules:
              - actions:
                  - mailto:cat@example.com
                filter:
                  function: pipelines.name_like_in_group
                  args:
                    - .+-release.*
                    - my-group
        """
    ) == [
        "configuration.yml:13: managers[0].rules[0].filter.args[0]: regular expression"
        " '.+-release.*' has no group: its first group names the pipeline to look up,"
        " e.g. '(.+)-release.*'",
    ]


def test_an_unknown_event_is_reported_with_a_suggestion() -> None:
    assert problems(
        """\
        remote-smtp: localhost:8025
        managers:
          - name: gocd
            messages-we-want:
              to: mail2alert@example.com
            rules:
              - actions:
                  - mailto:cat@example.com
                filter:
                  events:
                    - BREAKS
                    - BRAKES
                  function: pipelines.any
        """
    ) == [
        "configuration.yml:12: managers[0].rules[0].filter.events: unknown event 'BRAKES'"
        " (did you mean 'BREAKS'?) (known: PASSES, FAILS, BREAKS, FIXED, CANCELLED)",
    ]


def test_an_action_with_an_unsupported_scheme_is_reported() -> None:
    assert problems(
        """\
        remote-smtp: localhost:8025
        managers:
          - name: mail
            messages-we-want:
              from: go@example.com
            rules:
              - actions:
                  - mailto:ops@example.com
                  - xmpp:ops@example.com
                filter:
                  function: mail.in_subject
                  args: [backup]
        """
    ) == [
        "configuration.yml:9: managers[0].rules[0].actions[1]: unsupported action scheme"
        " 'xmpp:' (use mailto:, slack:, committers: or a chat URL)",
    ]


def test_a_slack_channel_action_without_a_slack_token_is_reported() -> None:
    assert problems(
        """\
        remote-smtp: localhost:8025
        managers:
          - name: mail
            messages-we-want:
              from: go@example.com
            rules:
              - actions:
                  - slack:#builds
                filter:
                  function: mail.in_subject
                  args: [backup]
        """
    ) == [
        "configuration.yml:8: managers[0].rules[0].actions[0]: slack: actions post with the"
        " top-level 'slack-token'; set it",
    ]


def test_an_unknown_chat_url_scheme_and_a_malformed_chat_url_are_reported() -> None:
    assert problems(
        """\
        remote-smtp: localhost:8025
        managers:
          - name: mail
            messages-we-want:
              from: go@example.com
            rules:
              - actions:
                  - nochat://somewhere/x
                  - tgram://nonsense
                filter:
                  function: mail.in_subject
                  args: [backup]
        """
    ) == [
        "configuration.yml:8: managers[0].rules[0].actions[0]: unknown notification scheme"
        " 'nochat://' (see Apprise's list of services)",
        "configuration.yml:9: managers[0].rules[0].actions[1]: 'tgram://***' is not a valid"
        " tgram:// URL",
    ]


def test_a_template_that_cannot_render_is_reported_with_its_line() -> None:
    assert problems(
        """\
        remote-smtp: localhost:8025
        managers:
          - name: mail
            messages-we-want:
              from: go@example.com
            rules:
              - actions: [json://localhost:8080/hook]
                template:
                  title: "{{ pipeline | nosuchfilter }}"
                filter:
                  function: mail.in_subject
                  args: [backup]
        """
    ) == [
        "configuration.yml:9: managers[0].rules[0].template: template error (template line 1):"
        " No filter named 'nosuchfilter'.",
    ]


def test_an_apprise_mail_url_is_refused_without_showing_its_password() -> None:
    """``mailto://user:password@host`` is Apprise's e-mail URL; taken for a mail action, its
    login would be a recipient's address, in the outbox, the console and the log."""
    found = problems(
        """\
        remote-smtp: localhost:8025
        managers:
          - name: mail
            messages-we-want:
              from: go@example.com
            rules:
              - actions:
                  - mailto://alerts:S3cretAppPW@gmail.com
                filter:
                  function: mail.in_subject
                  args: [backup]
        """
    )
    assert len(found) == 1
    assert found[0].startswith("configuration.yml:8: managers[0].rules[0].actions[0]: ")
    assert "mail2alert sends mail itself, through remote-smtp" in found[0]
    assert "S3cretAppPW" not in found[0]


def test_a_slack_webhook_written_short_of_a_slash_is_refused_without_its_token() -> None:
    found = problems(
        """\
        remote-smtp: localhost:8025
        managers:
          - name: mail
            messages-we-want:
              from: go@example.com
            rules:
              - actions:
                  - slack:/T0ABC/B0DEF/xyzSECRETwebhookTOKEN1234
                filter:
                  function: mail.in_subject
                  args: [backup]
        """
    )
    assert found == [
        "configuration.yml:8: managers[0].rules[0].actions[0]: 'slack:***': write"
        " slack:#channel, slack:@user, optionally with :brief or :full (or use a slack://"
        " webhook URL)"
    ]


def test_a_mailto_action_with_a_bad_address_is_reported() -> None:
    assert problems(
        """\
        remote-smtp: localhost:8025
        managers:
          - name: mail
            messages-we-want:
              from: go@example.com
            rules:
              - actions:
                  - mailto:ops@
                filter:
                  function: mail.in_subject
                  args: [backup]
        """
    ) == [
        "configuration.yml:8: managers[0].rules[0].actions[0]: 'mailto:ops@' is not a valid"
        " mail address",
    ]


def test_a_bad_host_port_is_reported() -> None:
    assert problems(
        """\
        local-smtp: localhost:99999
        remote-smtp: localhost
        managers: []
        """
    ) == [
        "configuration.yml:1: local-smtp: expected host:port (e.g. localhost:1025 or"
        " \"[::1]:1025\"), got 'localhost:99999'",
        "configuration.yml:2: remote-smtp: expected host:port (e.g. localhost:1025 or"
        " \"[::1]:1025\"), got 'localhost'",
    ]


def test_events_on_a_manager_without_events_is_reported() -> None:
    assert problems(
        """\
        remote-smtp: localhost:8025
        managers:
          - name: mail
            messages-we-want:
              from: go@example.com
            rules:
              - actions:
                  - mailto:ops@example.com
                filter:
                  events: [BREAKS]
                  function: mail.in_subject
                  args: [backup]
        """
    ) == [
        "configuration.yml:10: managers[0].rules[0].filter.events: the mail manager has no"
        " events: remove 'events'",
    ]


def test_both_event_and_events_in_one_filter_is_reported() -> None:
    assert problems(
        """\
        remote-smtp: localhost:8025
        managers:
          - name: gocd
            messages-we-want:
              to: mail2alert@example.com
            rules:
              - actions:
                  - mailto:cat@example.com
                filter:
                  events: [BREAKS]
                  event: FIXED
                  function: pipelines.any
        """
    ) == [
        "configuration.yml:11: managers[0].rules[0].filter.event: give 'events' or 'event',"
        " not both",
    ]


def test_an_unset_environment_variable_is_reported_by_name_and_place() -> None:
    assert problems(
        """\
        remote-smtp: localhost:8025
        managers:
          - name: gocd
            url: http://localhost:8080/go
            user: $GOUSER
            passwd: ${GOPASS}
            messages-we-want:
              to: mail2alert@example.com
        """,
        {"GOUSER": "olle"},
    ) == [
        "configuration.yml:6: managers[0].passwd: environment variable 'GOPASS' is not set",
    ]


def test_a_duplicate_key_is_reported() -> None:
    assert problems(
        """\
        remote-smtp: localhost:8025
        managers: []
        remote-smtp: localhost:25
        """
    ) == [
        "configuration.yml:3: remote-smtp: duplicate key 'remote-smtp'",
    ]


def test_a_bad_duration_is_reported() -> None:
    assert problems(
        """\
        remote-smtp: localhost:8025
        managers: []
        delivery:
          retry-initial: 5 minutes
        """
    ) == [
        "configuration.yml:4: delivery.retry-initial: expected a positive duration like 30s,"
        " 10m, 1h, 5d or seconds, got '5 minutes'",
    ]


def test_retry_initial_longer_than_retry_max_is_reported() -> None:
    assert problems(
        """\
        remote-smtp: localhost:8025
        managers: []
        delivery:
          retry-initial: 2h
          retry-max: 1h
        """
    ) == [
        "configuration.yml:4: delivery: retry-initial must not be longer than retry-max",
    ]


def test_an_empty_address_list_in_messages_we_want_is_reported() -> None:
    """An empty list would leave the manager without criteria, and it would take all mail."""
    assert problems(
        """\
        remote-smtp: localhost:8025
        managers:
          - name: mail
            messages-we-want:
              to: []
        """
    ) == [
        "configuration.yml:5: managers[0].messages-we-want.to: needs at least one address",
    ]


def test_an_empty_file_is_reported() -> None:
    assert problems("") == ["configuration.yml: the file is empty"]


def test_every_problem_is_reported_at_once_in_file_order() -> None:
    assert problems(
        """\
        local-smtp: localhost
        remote-smtp: localhost:8025
        managers:
          - name: gocd
            url: http://localhost:8080/go
            passwd: $GOPASS
            messages-we-want:
              to: mail2alert@example.com
            rules:
              - actions:
                  - mailto:cat@example.com
                filter:
                  function: pipelines.in_grup
                  args: [my-group]
          - name: mail
            messages-we-want:
              from: go@example.com
            rules:
              - actions:
                  - sms:+4612345
                filter:
                  function: mail.in_subject
                  args: [backup]
        delivery:
          retry-max: forever
        """
    ) == [
        "configuration.yml:1: local-smtp: expected host:port (e.g. localhost:1025 or"
        " \"[::1]:1025\"), got 'localhost'",
        "configuration.yml:6: managers[0].passwd: environment variable 'GOPASS' is not set",
        "configuration.yml:13: managers[0].rules[0].filter.function: unknown function"
        " 'pipelines.in_grup' for the gocd manager (did you mean 'pipelines.in_group'?)",
        "configuration.yml:20: managers[1].rules[0].actions[0]: unsupported action scheme"
        " 'sms:' (use mailto:, slack:, committers: or a chat URL)",
        "configuration.yml:25: delivery.retry-max: expected a positive duration like 30s,"
        " 10m, 1h, 5d or seconds, got 'forever'",
    ]


# -- finding and reading the file --------------------------------------------------------------


def test_config_path_prefers_the_option(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(config.ENV_CONFIG, "/etc/mail2alert/configuration.yml")

    assert config.config_path("given.yml") == Path("given.yml")


def test_config_path_falls_back_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAIL2ALERT_CONFIGURATION", "/etc/mail2alert/configuration.yml")

    assert config.config_path(None) == Path("/etc/mail2alert/configuration.yml")


def test_config_path_defaults_to_the_working_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MAIL2ALERT_CONFIGURATION", raising=False)

    assert config.config_path(None) == Path("configuration.yml")


def test_load_reads_a_file_and_names_it_in_problems(tmp_path: Path) -> None:
    path = tmp_path / "configuration.yml"
    path.write_text("remote-smtp: localhost\nmanagers: []\n", encoding="utf-8")

    with pytest.raises(ConfigError) as caught:
        config.load(path, env={})

    assert [str(p) for p in caught.value.problems] == [
        f"{path}:1: remote-smtp: expected host:port (e.g. localhost:1025 or"
        " \"[::1]:1025\"), got 'localhost'",
    ]


def test_load_takes_variables_from_the_process_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "configuration.yml"
    path.write_text("remote-smtp: $UPSTREAM\nmanagers: []\n", encoding="utf-8")
    monkeypatch.setenv("UPSTREAM", "mx.example.com:25")

    assert config.load(path).remote_smtp == HostPort("mx.example.com", 25)


def test_load_of_a_missing_file_is_one_problem(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.yml"

    with pytest.raises(ConfigError) as caught:
        config.load(path)

    assert [str(p) for p in caught.value.problems] == [
        f"{path}: no such file: {path} (named by --config)"
    ]


@pytest.mark.usefixtures("restore_logging")
def test_a_missing_default_configuration_says_how_to_name_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(config.ENV_CONFIG, raising=False)

    assert cli.main(["check"]) == 1
    assert capsys.readouterr().err.splitlines()[0] == (
        f"configuration.yml: no such file: {tmp_path / 'configuration.yml'} (the default;"
        " name another with --config PATH or $MAIL2ALERT_CONFIGURATION)"
    )


@pytest.mark.usefixtures("restore_logging")
def test_a_missing_configuration_named_by_the_environment_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "etc" / "mail2alert.yml"
    monkeypatch.setenv(config.ENV_CONFIG, str(path))

    assert cli.main(["check"]) == 1
    assert capsys.readouterr().err.splitlines()[0] == (
        f"{path}: no such file: {path} (named by $MAIL2ALERT_CONFIGURATION)"
    )


# -- mail2alert check ---------------------------------------------------------------------------


@pytest.mark.usefixtures("restore_logging")
def test_check_of_a_valid_file_prints_one_summary_line(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["check", "--config", str(EXAMPLE)])

    out, err = capsys.readouterr()
    assert code == 0
    assert out == f"{EXAMPLE}: OK, 2 managers (gocd, mail), 3 rules, 4 actions\n"
    assert err == ""


@pytest.mark.usefixtures("restore_logging")
def test_check_of_an_invalid_file_prints_every_problem_and_a_count(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "configuration.yml"
    path.write_text(
        textwrap.dedent(
            """\
            remote-smtp: localhost:8025
            managers:
              - name: mail
                messages-we-want:
                  from: go@example.com
                rules:
                  - actions:
                      - mailto:ops@
                    filter:
                      function: mail.in_subjet
                      args: [backup]
            """
        ),
        encoding="utf-8",
    )

    code = cli.main(["check", "--config", str(path)])

    out, err = capsys.readouterr()
    assert code == 1
    assert out == ""
    assert err.splitlines() == [
        f"{path}:8: managers[0].rules[0].actions[0]: 'mailto:ops@' is not a valid mail address",
        f"{path}:10: managers[0].rules[0].filter.function: unknown function 'mail.in_subjet'"
        " for the mail manager (did you mean 'mail.in_subject'?)",
        f"{path}: invalid, 2 problems",
    ]


@pytest.mark.usefixtures("restore_logging")
def test_check_finds_the_file_through_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MAIL2ALERT_CONFIGURATION", str(EXAMPLE))

    code = cli.main(["check"])

    assert code == 0
    assert capsys.readouterr().out.startswith(f"{EXAMPLE}: OK, ")


@pytest.mark.usefixtures("restore_logging")
def test_check_of_a_missing_file_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "configuration.yml"

    code = cli.main(["check", "--config", str(path)])

    assert code == 1
    assert capsys.readouterr().err.splitlines() == [
        f"{path}: no such file: {path} (named by --config)",
        f"{path}: invalid, 1 problem",
    ]


def test_an_empty_events_list_is_reported_because_the_rule_could_never_match() -> None:
    assert problems(
        """\
        remote-smtp: localhost:8025
        managers:
          - name: gocd
            messages-we-want:
              to: mail2alert@example.com
            rules:
              - actions: [mailto:cat@example.com]
                filter:
                  function: pipelines.any
                  events: []
        """
    ) == [
        "configuration.yml:10: managers[0].rules[0].filter.events: an empty list matches no"
        " event, so the rule could never match; list events, or remove the key to match mail"
        " whatever its event",
    ]


def test_a_stray_block_scalar_above_a_password_shows_no_password_in_the_error() -> None:
    """Found by tests/test_fuzz.py: "managers: |" made every line below it one text value,
    and the problem about it showed that value, the gocd password in it."""
    text = EXAMPLE.read_text(encoding="utf-8").replace("managers:", "managers: |", 1)

    shown = "\n".join(problems(text))

    assert "managers: expected" in shown
    assert "pelle" not in shown
    assert "passwd: ***" in shown


# -- what a value must be, beyond its type (found by a review) -----------------------------------

MAIL = """\
remote-smtp: localhost:8025
managers:
  - name: mail
    messages-we-want: {from: go@example.com}
    rules:
      - actions: [mailto:a@example.com]
        filter: {function: mail.in_subject, args: [x]}
"""


@pytest.mark.parametrize("value", ["0x10", "0b11", "1:30"])
def test_a_number_not_written_in_decimal_is_a_problem_not_a_traceback(value: str) -> None:
    """YAML 1.1 reads these as numbers too."""
    assert problems(MAIL + f"delivery: {{connections: {value}}}\n") == [
        f"configuration.yml:8: delivery.connections: expected a whole number from 1 to 1000,"
        f" got {value!r}"
    ]


def test_a_number_too_big_to_keep_is_a_problem() -> None:
    found = problems(MAIL + "history: {max-messages: 9223372036854775808}\n")
    assert found[0].startswith("configuration.yml:8: history.max-messages: expected a whole")


@pytest.mark.parametrize(
    ("key", "value"),
    [("sender", '"alerts@example.com\\r\\nRCPT TO:<x@evil.test>"'), ("helo", '"mx\\r\\nRSET"')],
)
def test_a_line_break_in_what_is_said_to_the_smarthost_is_a_problem(key: str, value: str) -> None:
    """``sender`` and ``helo`` go onto the SMTP connection as they are: a line break would
    start another command."""
    text = MAIL.replace(
        "remote-smtp: localhost:8025", f"remote-smtp: {{address: localhost:8025, {key}: {value}}}"
    )
    found = problems(text)
    assert len(found) == 1
    assert found[0].startswith(f"configuration.yml:1: remote-smtp.{key}: ")


def test_an_empty_slack_token_with_slack_actions_is_a_problem() -> None:
    """``slack-token: $T`` with T set to nothing: every post would be dead."""
    text = "slack-token: $T\n" + MAIL.replace("[mailto:a@example.com]", '["slack:#builds"]')
    assert problems(text, {"T": ""}) == [
        "configuration.yml:7: managers[0].rules[0].actions[0]: slack: actions post with the"
        " top-level 'slack-token'; set it"
    ]


def test_a_ca_file_that_is_no_ca_bundle_is_a_problem(tmp_path: Path) -> None:
    bundle = tmp_path / "ca.pem"
    bundle.write_text("being replaced\n")
    text = MAIL.replace(
        "remote-smtp: localhost:8025",
        f"remote-smtp: {{address: localhost:8025, tls: starttls, ca-file: {bundle}}}",
    )
    (found,) = problems(text)
    assert found.startswith(f"configuration.yml:1: remote-smtp.ca-file: '{bundle}' is no CA bundle")


@pytest.mark.parametrize(
    "url", ["https://ci.example.com:99999/go", "olle:s3cretpw@ci.example.com/go"]
)
def test_a_gocd_url_that_cannot_be_used_is_a_problem_that_shows_no_login(url: str) -> None:
    text = """\
remote-smtp: localhost:8025
managers:
  - name: gocd
    url: URL
    messages-we-want: {to: mail2alert@example.com}
    rules:
      - actions: [mailto:a@example.com]
        filter: {function: pipelines.any}
""".replace("URL", url)
    (found,) = problems(text)
    assert found.startswith("configuration.yml:4: managers[0].url: expected an http:// or https://")
    assert "s3cretpw" not in found


@pytest.mark.parametrize("address", ["GoCD <go@example.com>", "a@example.com, b@example.com"])
def test_messages_we_want_takes_plain_addresses_only(address: str) -> None:
    """They are compared with the envelope as written: these would never match."""
    text = MAIL.replace("{from: go@example.com}", f"{{from: '{address}'}}")
    assert problems(text) == [
        f"configuration.yml:4: managers[0].messages-we-want.from: {address.lower()!r} is not a"
        " mail address (one plain address per entry; give several as a list)"
    ]


def test_an_action_that_is_no_uri_is_not_repeated_past_its_first_slash() -> None:
    """A webhook written without its scheme carries its secret in the path."""
    text = MAIL.replace("[mailto:a@example.com]", "[hooks.slack.com/services/T000/B000/SECRETXYZ]")
    (found,) = problems(text)
    assert "SECRETXYZ" not in found
    assert "'hooks.slack.com/***' is not a URI" in found


@pytest.mark.parametrize(
    ("local", "http"),
    [("127.0.0.1:19525", "127.0.0.1:19525"), ("0.0.0.0:19525", "localhost:19525")],
)
def test_local_smtp_and_http_on_one_port_is_a_problem(local: str, http: str) -> None:
    """``check`` said OK, and ``serve`` then stopped on a busy port."""
    text = f"local-smtp: {local}\nhttp: {http}\n" + MAIL
    assert problems(text) == [
        f"configuration.yml:2: http: local-smtp ({local}) and http ({http}) would take the"
        " same port: give each its own"
    ]


def test_each_listener_on_a_free_port_of_its_own_is_no_clash() -> None:
    assert parse("local-smtp: 127.0.0.1:0\nhttp: 127.0.0.1:0\n" + MAIL).http is not None


@pytest.mark.parametrize(
    ("yaml_text", "where", "most"),
    [
        ("delivery: {connections: 100000000000}\n", "8: delivery.connections", 1000),
        ("intake-workers: 100000\n", "8: intake-workers", 64),
    ],
)
def test_a_number_no_machine_could_run_is_a_problem(yaml_text: str, where: str, most: int) -> None:
    """Each connection is a task, each worker a process: 10^11 of them would not start."""
    value = yaml_text.split(":")[-1].strip(" }\n")
    assert problems(MAIL + yaml_text) == [
        f"configuration.yml:{where}: expected a whole number from 1 to {most}, got {value!r}"
    ]


def test_a_sender_ending_in_a_line_break_is_a_problem() -> None:
    """A regular expression's $ also matches before a final line break: the check must not
    let one through onto the wire."""
    upstream = 'remote-smtp: {address: localhost:8025, sender: "alerts@example.com\\n"}'
    (found,) = problems(MAIL.replace("remote-smtp: localhost:8025", upstream))
    assert found.startswith("configuration.yml:1: remote-smtp.sender: ")
