"""Properties over any input: bytes in give an answer, never an exception.

Hypothesis searches for a counter-example to each property within the profile of
``tests/conftest.py`` (derandomized and bounded, so every run gives the same verdict). The
inputs are arbitrary bytes and text, and mails built to be hostile: folded fields, encoded
words in every charset (unknown and broken ones too), bare CR and LF, NULs, 8-bit bytes,
huge lines, no blank line after the header. An input that once broke a property is kept as
an ``@example`` of it, and as a regression test of its own where the fix lives.
"""

from __future__ import annotations

import base64
import codecs
import email.utils
import quopri
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from hypothesis import example, given
from hypothesis import strategies as st

from mail2alert import config
from mail2alert.config import Config
from mail2alert.errors import ConfigError
from mail2alert.explain import snapshots_from_files
from mail2alert.gocd.manager import GOCD, parse_subject
from mail2alert.gocd.memory import HISTORY
from mail2alert.gocd.model import VERBS, Stage
from mail2alert.gocd.testing import gocd_stage_mail
from mail2alert.managers.base import Context
from mail2alert.message import (
    RawMessage,
    address_of,
    decode_header_value,
    received_header,
    rewrite,
)
from mail2alert.model import ChatPost, Envelope
from mail2alert.planning import THREADS, accept
from mail2alert.routing import route
from mail2alert.server import describe
from tests.helpers import EXAMPLE
from tests.test_message_bounds import is_valid_unicode

ROOT = Path(__file__).resolve().parent.parent
SNAPSHOT = ROOT / "examples" / "gocd-snapshot.json"


# -- strategies: hostile pieces of mail ---------------------------------------------------------

#: Charsets an encoded word may name: common, exotic, codecs that are no text encoding, and
#: names that are no codec at all.
CHARSETS = [
    "utf-8",
    "UTF-8",
    "us-ascii",
    "iso-8859-1",
    "windows-1252",
    "koi8-r",
    "iso-2022-jp",
    "shift_jis",
    "gb18030",
    "big5",
    "utf-7",
    "utf-16",
    "utf-16-le",
    "utf-32",
    "idna",
    "punycode",
    "rot13",
    "hex",
    "base64",
    "uu",
    "unicode-escape",
    "raw-unicode-escape",
    "x-no-such-charset",
    "",
    "utf-8*en",
    "\xff",
]


@st.composite
def encoded_words(draw: st.DrawFn) -> bytes:
    """One RFC 2047 encoded word, well formed or not."""
    charset = draw(st.sampled_from(CHARSETS)).encode("latin-1")
    payload = draw(st.binary(max_size=40))
    encoding = draw(st.sampled_from([b"B", b"b", b"Q", b"q", b"X", b""]))
    if encoding in (b"B", b"b") and draw(st.booleans()):
        text = base64.b64encode(payload)
    elif encoding in (b"Q", b"q") and draw(st.booleans()):
        text = quopri.encodestring(payload, header=True).replace(b"\n", b"")
    else:
        text = payload.replace(b"?=", b"")
    end = draw(st.sampled_from([b"?=", b"?=", b"", b"?"]))
    return b"=?" + charset + b"?" + encoding + b"?" + text + end


#: Bytes that have broken mail parsers: line ends of every kind, NUL, 8-bit, RFC 2047 marks,
#: MIME boundaries, colons, quotes and brackets.
SHARDS = [
    b"\r\n",
    b"\n",
    b"\r",
    b"\r\r\n",
    b"\x00",
    b"\xff",
    b"\xc3\xa9",
    b"\xe2\x80\xa8",
    b"=?",
    b"?=",
    b"?Q?",
    b"?B?",
    b"--",
    b":",
    b";",
    b'"',
    b"<",
    b">",
    b"\\",
    b"(",
    b",",
    b"@",
    b" ",
    b"\t",
    b"\r\n ",
    b"\n\t",
]


def repeated(piece: bytes, most: int) -> st.SearchStrategy[bytes]:
    """``piece`` repeated up to ``most`` times: a huge line, cheap to make."""
    return st.integers(0, most).map(lambda n: piece * n)


text_bytes = st.text(max_size=40).map(lambda t: t.encode("utf-8", "surrogatepass"))
latin1_bytes = st.text(st.characters(max_codepoint=255), max_size=40).map(
    lambda t: t.encode("latin-1")
)
value_pieces = st.one_of(
    text_bytes,
    latin1_bytes,
    encoded_words(),
    st.sampled_from(SHARDS),
    st.binary(max_size=20),
    repeated(b"x", 5000),
    repeated(b"=?utf-8?Q?a?=", 500),
)
#: A field value: pieces glued together, so folds, CRs and NULs land anywhere in it.
hostile_values = st.lists(value_pieces, max_size=8).map(b"".join)

FIELD_NAMES = [
    "Subject",
    "From",
    "To",
    "Cc",
    "Message-ID",
    "Received",
    "Content-Type",
    "Content-Transfer-Encoding",
    "MIME-Version",
    "subject",
    "SUBJECT",
    "X-Mailer",
]
field_names = st.one_of(st.sampled_from(FIELD_NAMES), st.from_regex(r"\A[!-9;-~]{1,20}\Z")).map(
    lambda n: n.encode("ascii")
)

MIME_BODIES = [
    b"--b\r\nContent-Type: text/plain\r\n\r\ncut short",
    b"--b\r\n--b--\r\n--b\r\n",
    b'--b\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n',
    b"--b\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!not base64",
    b"--b\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n=\r\n=ZZ=\xff",
    b"From the start of an mbox line\r\n.\r\n..\r\n",
]
bodies = st.one_of(
    st.binary(max_size=300),
    st.sampled_from(MIME_BODIES),
    st.lists(value_pieces, max_size=6).map(b"".join),
)


@st.composite
def hostile_mails(draw: st.DrawFn) -> bytes:
    """A mail of hostile fields; the blank line may be of any kind, or missing."""
    fields = draw(st.lists(st.tuples(field_names, hostile_values), max_size=10))
    newline = draw(st.sampled_from([b"\r\n", b"\n"]))
    head = b"".join(name + b":" + value + newline for name, value in fields)
    blank = draw(st.sampled_from([newline, b"\r\n", b"\n", b""]))
    return head + blank + draw(bodies)


#: Values of fields that are well formed as RFC 5322 lines go (any bytes but CR and LF,
#: folded with a CRLF or LF and a space or tab), however odd their content.
clean_values = st.lists(
    st.one_of(
        st.binary(max_size=30).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
        encoded_words().map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
        st.sampled_from([b"\r\n ", b"\r\n\t", b"\n "]),
    ),
    max_size=6,
).map(b"".join)


any_mail = st.one_of(st.binary(max_size=2000), hostile_mails())


# -- the message parser ---------------------------------------------------------------------------


@given(any_mail)
@example(b"")
@example(b" leading continuation\r\nSubject: x\r\n\r\n")
@example(b"Subject: x\r")
def test_any_bytes_split_into_fields_that_tile_the_header_and_a_body_that_is_the_rest(
    data: bytes,
) -> None:
    message = RawMessage.parse(data)

    assert b"".join(f.raw for f in message.fields) == data[: message.header_end]
    assert message.header_end <= message.body_offset <= len(data)
    assert message.body == data[message.body_offset :]
    assert data[message.header_end : message.body_offset] in (b"", b"\r\n", b"\n")
    for f in message.fields:
        assert f.raw[: len(f.name) + 1].lower() == f.name.encode("ascii") + b":"


@given(any_mail)
@example(b"From: " + b"(" * 5000 + b"\r\n\r\n")
@example(b"From: " + b"x" * 200_000 + b"\r\n\r\n")
def test_every_field_of_any_mail_reads_as_valid_text(data: bytes) -> None:
    message = RawMessage.parse(data)

    for name in {f.name for f in message.fields} | {"subject", "from", "message-id"}:
        text = message.get(name)
        assert is_valid_unicode(text)
        assert is_valid_unicode(address_of(text))
    assert is_valid_unicode(message.body_text)


@given(
    st.lists(st.tuples(field_names, clean_values), max_size=10),
    st.sampled_from([b"\r\n", b"\n"]),
    bodies,
)
def test_a_mail_of_well_formed_fields_splits_into_exactly_those_fields_and_its_body(
    fields: list[tuple[bytes, bytes]], newline: bytes, body: bytes
) -> None:
    raws = [name + b":" + value + newline for name, value in fields]

    message = RawMessage.parse(b"".join(raws) + newline + body)

    assert [f.raw for f in message.fields] == raws
    assert [f.name for f in message.fields] == [n.decode("ascii").lower() for n, _ in fields]
    assert message.body == body


@given(st.lists(encoded_words(), min_size=1, max_size=5), st.sampled_from([b" ", b"\r\n ", b""]))
@example([b"=?utf-16?B?AADY?="], b" ")
@example([b"=?punycode?Q?=FF?="], b" ")
@example([b"=?unicode-escape?B?XCA=?="], b" ")
def test_encoded_words_in_any_charset_decode_to_valid_text(words: list[bytes], gap: bytes) -> None:
    assert is_valid_unicode(decode_header_value(gap.join(words)))


#: Charsets a mailer encodes an ASCII subject in; each keeps ASCII as it is.
ASCII_CHARSETS = ["utf-8", "us-ascii", "iso-8859-1", "windows-1252", "koi8-r", "gb18030"]


@st.composite
def encoded(draw: st.DrawFn, text: str) -> bytes:
    """``text`` as encoded words (cut anywhere, each in its own charset and encoding),
    folded between words, as relays re-encode subjects."""
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(text) - 1)), max_size=4)))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    words = []
    for piece in pieces:
        charset = draw(st.sampled_from(ASCII_CHARSETS))
        raw = piece.encode(charset)
        if draw(st.booleans()):
            words.append(f"=?{charset}?B?{base64.b64encode(raw).decode()}?=")
        else:
            quoted = quopri.encodestring(raw, header=True).decode().replace("=\n", "")
            words.append(f"=?{charset}?Q?{quoted.replace('?', '=3F')}?=")
    gaps = [draw(st.sampled_from([" ", "\r\n ", "\r\n\t", "\n "])) for _ in words[1:]]
    return "".join(w + g for w, g in zip(words, [*gaps, ""], strict=True)).encode("ascii")


# -- the GoCD subject parser ----------------------------------------------------------------------

NAMES = st.from_regex(r"\A[A-Za-z0-9_\-][A-Za-z0-9_\-.]{0,30}\Z")
COUNTERS = st.integers(0, 2**63 - 1)
stages = st.builds(Stage, NAMES, COUNTERS, NAMES, COUNTERS, st.sampled_from(sorted(VERBS)))


def subject_of(stage: Stage, space: Callable[[], str] = lambda: " ") -> str:
    verb = space().join(stage.verb.split(" "))
    return f"Stage [{stage.locator}]{space()}{verb}"


@given(st.text(max_size=200))
@example("Stage [a/" + "9" * 5000 + "/b/1] failed")
@example("Stage [a/1/b/1] failed\u2028")
@example("Stage [a/\u0663/b/\uff11] failed")
def test_any_text_is_no_stage_subject_or_names_a_stage_of_its_own_words(subject: str) -> None:
    stage = parse_subject(subject)

    if stage is not None:
        assert stage.verb in VERBS
        assert stage.locator in subject


@given(stages, st.lists(st.sampled_from([" ", "  ", "\t", " \t "]), min_size=3, max_size=3))
def test_a_stage_subject_names_its_stage_however_its_spaces_run(
    stage: Stage, spaces: list[str]
) -> None:
    run = iter(spaces)

    assert parse_subject(subject_of(stage, lambda: next(run, " "))) == stage


@given(stages, st.data())
def test_a_stage_subject_in_encoded_words_names_the_same_stage_in_the_mail(
    stage: Stage, data: st.DataObject
) -> None:
    subject = data.draw(encoded(subject_of(stage)))
    mail = gocd_stage_mail("SUBJECT").replace(b"SUBJECT", subject)
    envelope = Envelope("go@example.com", ("mail2alert@example.com",))

    alert = GOCD.read(RawMessage.parse(mail), envelope, Context())

    assert alert.subject == subject_of(stage)
    assert alert.detail == stage


# -- the From/To rewrite --------------------------------------------------------------------------

addresses = st.emails().filter(lambda a: len(a) < 200)


@given(
    any_mail,
    st.none() | addresses,
    st.lists(addresses, min_size=1, max_size=5).map(tuple),
)
@example(b"Subject: x", None, ("a@example.com",))
@example(b"no field here\r\n\r\nbody", "go@example.com", ("a@example.com",))
def test_a_rewritten_mail_parses_with_the_same_body_and_fields_and_no_new_header(
    data: bytes, from_value: str | None, to: tuple[str, ...]
) -> None:
    message = RawMessage.parse(data)
    nl = message.newline
    prepend = b"Received: from ci by relay; Tue, 1 Dec 2026 20:27:41 +0000" + nl

    out = RawMessage.parse(
        rewrite(message, from_value=from_value, to_addresses=to, prepend=prepend)
    )

    assert out.body == message.body
    assert out.data.endswith(data[message.header_end :])
    assert out.fields[0].raw == prepend
    replaced = ("from", "to") if from_value is not None else ("to",)
    kept = [f.raw if f.raw.endswith(b"\n") else f.raw + nl for f in message.fields]
    assert [f.raw for f in out.fields[1:] if f.name not in replaced] == [
        raw for raw, f in zip(kept, message.fields, strict=True) if f.name not in replaced
    ]
    for name in replaced:
        assert [f.name for f in out.fields].count(name) == 1
    assert [a for _, a in email.utils.getaddresses([out.get("to")])] == list(to)
    if from_value is not None:
        assert address_of(out.get("from")) == from_value


# -- the config loader ----------------------------------------------------------------------------

#: Problems about the whole file, which no line can locate.
WHOLE_FILE = re.compile(r"^(the file is empty|empty configuration|YAML error: )")


def loaded_or_located(text: str, filename: str = "fuzz.yml") -> Config | ConfigError:
    """Load ``text``; a ConfigError is fine when each of its problems names the file and
    a line of it (or, for the whole file, says so)."""
    try:
        return config.parse(text, filename, {})
    except ConfigError as exc:
        error = exc
    assert error.problems
    lines = len(text.splitlines()) + 1
    for problem in error.problems:
        assert problem.file == filename
        assert 0 <= problem.line <= lines, str(problem)
        assert problem.line > 0 or WHOLE_FILE.match(problem.message), str(problem)
    return error


KEYS = [
    "local-smtp",
    "remote-smtp",
    "managers",
    "data-dir",
    "delivery",
    "intake-workers",
    "slack-token",
    "slack-api-url",
    "name",
    "messages-we-want",
    "to",
    "from",
    "rules",
    "actions",
    "filter",
    "function",
    "args",
    "events",
    "fallback",
    "url",
    "user",
    "passwd",
    "token",
    "hold-max",
    "address",
    "tls",
    "auth",
    "allowed-clients",
    "max-message-size",
    "retry-initial",
    "timeout",
    "template",
]
SCALARS = [
    "",
    "~",
    "gocd",
    "mail",
    "localhost:1025",
    "[::1]:25",
    "127.0.0.1:99999",
    "pipelines.in_group",
    "pipelines.name_like_in_group",
    "mail.in_subject",
    "no.such_function",
    "(.+)-release.*",
    "(",
    "BREAKS",
    "mailto:cat@example.com",
    "mailto:",
    "slack:#team",
    "json://localhost/hook",
    "nope://x",
    "$UNSET",
    "${",
    "$$",
    "1m",
    "0s",
    "-1",
    "1e400",
    "99999999999999999999",
    "{{ broken",
    "auto",
]
yaml_scalars = st.one_of(
    st.sampled_from(SCALARS), st.integers(), st.booleans(), st.none(), st.text(max_size=20)
)
#: YAML documents shaped like a configuration: our keys, nested anyhow, with odd values.
yaml_documents = st.recursive(
    yaml_scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=25,
)

EXAMPLE_LINES = EXAMPLE.read_text(encoding="utf-8").splitlines()
#: What a hand edit may put where a value was.
HOSTILE_SCALARS = [
    "",
    "~",
    "[]",
    "{}",
    "&a [*a]",
    "*nowhere",
    "!!binary AAAA",
    "!!python/object/apply:os.system [id]",
    "'",
    '"\\',
    "1e400",
    "-1",
    "99999999999999999999",
    "$UNSET",
    "${",
    "[::1]:99999",
    "|",
    ">",
    "? x",
    "- - x",
    "(.+",
    "mailto:",
    "slack://",
    "\t",
    "\x00",
    "\ufeff",
]


@st.composite
def mutated_examples(draw: st.DrawFn) -> str:
    """examples/configuration.yml after a few careless edits of whole lines."""
    lines = list(EXAMPLE_LINES)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(lines) - 1))
        edit = draw(st.sampled_from(["delete", "repeat", "swap", "indent", "dedent", "value"]))
        if edit == "delete":
            del lines[i]
        elif edit == "repeat":
            lines.insert(i, lines[i])
        elif edit == "swap":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        elif edit == "indent":
            lines[i] = draw(st.sampled_from([" ", "  ", "\t"])) + lines[i]
        elif edit == "dedent":
            lines[i] = lines[i][2:]
        else:
            head = lines[i].split(":", 1)[0] + ":" if ":" in lines[i] else lines[i][:4]
            lines[i] = f"{head} {draw(st.sampled_from(HOSTILE_SCALARS) | st.text(max_size=30))}"
        if not lines:
            break
    return "\n".join(lines) + draw(st.sampled_from(["\n", "", "\r\n"]))


@given(st.text(max_size=300) | st.sampled_from(SCALARS))
@example("[" * 5000)
@example("a: &a [*a]")
@example("managers: &m [*m]\nremote-smtp: localhost:25")
def test_any_text_loads_or_fails_with_problems_that_name_the_file_and_a_line(text: str) -> None:
    loaded_or_located(text)


@given(yaml_documents)
def test_any_yaml_document_loads_or_fails_with_problems_that_name_the_file_and_a_line(
    document: object,
) -> None:
    loaded_or_located(yaml.safe_dump(document, allow_unicode=True))


@given(mutated_examples())
def test_any_edit_of_the_example_loads_or_fails_with_problems_that_name_the_file_and_a_line(
    text: str,
) -> None:
    loaded_or_located(text)


@given(st.binary(max_size=500) | mutated_examples().map(lambda t: t.encode("utf-8")))
def test_any_bytes_in_a_configuration_file_load_or_fail_with_a_config_error(
    tmp_path_factory: pytest.TempPathFactory, data: bytes
) -> None:
    path = tmp_path_factory.getbasetemp() / "fuzz-configuration.yml"
    path.write_bytes(data)

    try:
        config.load(path, env={})
    except ConfigError as exc:
        problems = exc.problems
    else:
        return
    assert problems
    assert all(p.file == str(path) for p in problems)


@given(mutated_examples())
def test_no_edit_of_the_example_shows_its_gocd_password_in_an_error(text: str) -> None:
    secret = "pelle-s3cr3t-9f1c"
    loaded = loaded_or_located(text.replace("passwd: pelle", f"passwd: {secret}"))

    if isinstance(loaded, ConfigError):
        assert secret not in str(loaded)


# -- routing and planning, end to end in process ----------------------------------------------


def example_with_chat() -> Config:
    """The example configuration plus a gocd rule with chat actions, so templates render."""
    document = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    document["slack-token"] = "xoxb-fuzz"
    document["managers"][0]["rules"].append(
        {
            "actions": ["slack:#team:brief", "json://localhost/hook"],
            "filter": {"function": "pipelines.any"},
        }
    )
    return config.parse(yaml.safe_dump(document), "chat.yml", {})


CONFIGS = [config.load(EXAMPLE), example_with_chat()]
SNAPSHOTS = snapshots_from_files({"gocd": SNAPSHOT}, CONFIGS[0])
CONTEXTS = [
    Context(),
    Context(snapshots=SNAPSHOTS),
    Context(
        snapshots=SNAPSHOTS,
        state={
            HISTORY: {("my-pipeline", "my-stage"): "passed", ("ppp-release-1", "x"): "failed"},
            THREADS: {("gocd", "my-pipeline", "my-stage"): "<start@ci.example.com>"},
        },
    ),
]
ENVELOPE_SENDERS = ["go@example.com", "GO@example.com", "someone@example.net", ""]
ENVELOPE_RECIPIENTS = [
    "mail2alert@example.com",
    "MAIL2ALERT@EXAMPLE.COM",
    "admin@example.com",
    "ops@example.net",
]
envelopes = st.builds(
    Envelope,
    st.sampled_from(ENVELOPE_SENDERS),
    st.lists(st.sampled_from(ENVELOPE_RECIPIENTS), min_size=1, max_size=3, unique=True).map(tuple),
)


@st.composite
def stage_mails(draw: st.DrawFn) -> bytes:
    """A GoCD stage mail of a known or unknown pipeline, maybe with hostile bytes spliced in."""
    stage = draw(
        st.builds(
            Stage,
            st.sampled_from(["my-pipeline", "ppp-release-1", "deploy-infra"]) | NAMES,
            COUNTERS,
            st.sampled_from(["my-stage", "x"]) | NAMES,
            COUNTERS,
            st.sampled_from(sorted(VERBS)),
        )
    )
    body = draw(st.text(st.characters(max_codepoint=127), max_size=200))
    mail = bytearray(gocd_stage_mail(subject_of(stage), body=body))
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(mail)))
        mail[at:at] = draw(st.sampled_from(SHARDS) | st.binary(max_size=8))
    return bytes(mail)


@given(
    st.one_of(any_mail, stage_mails()),
    envelopes,
    st.sampled_from(range(len(CONFIGS))),
    st.sampled_from(range(len(CONTEXTS))),
    st.booleans(),
    st.text(max_size=30),
)
@example(b"", Envelope("go@example.com", ("admin@example.com",)), 0, 0, False, "")
def test_any_bytes_to_any_recipients_get_a_decision_and_items_that_keep_the_body(
    data: bytes,
    envelope: Envelope,
    config_index: int,
    context_index: int,
    stop_holding: bool,
    helo: str,
) -> None:
    routed_and_planned(
        data, envelope, CONFIGS[config_index], CONTEXTS[context_index], stop_holding, helo
    )


CORPUS = sorted((Path(__file__).resolve().parent / "data" / "nasty").glob("*.eml"))


@pytest.mark.parametrize("path", CORPUS, ids=[p.name for p in CORPUS])
@pytest.mark.parametrize("rcpt", ["mail2alert@example.com", "admin@example.com"])
def test_every_mail_of_the_nasty_corpus_raw_gets_a_decision_and_items_that_keep_the_body(
    path: Path, rcpt: str
) -> None:
    """The files as they are, bare CRs and LFs included (the e2e test sends them as CRLF)."""
    envelope = Envelope("go@example.com", (rcpt,))
    for config_ in CONFIGS:
        for context in CONTEXTS:
            routed_and_planned(path.read_bytes(), envelope, config_, context)


def routed_and_planned(
    data: bytes,
    envelope: Envelope,
    loaded: Config,
    context: Context,
    stop_holding: bool = False,
    helo: str = "client.test",
) -> None:
    """Route and plan ``data``: a decision, and items that keep its body, whatever it is."""
    managers = loaded.routing
    message = RawMessage.parse(data)
    route(managers, envelope, message, context)  # must not raise: accept() would hide it

    accepted = accept(
        "FUZZ", envelope, data, managers, context, helo=helo, stop_holding=stop_holding
    )

    decision = accepted.decision
    assert decision.outcome in ("deliver", "drop", "relay", "hold")
    assert "routing failed" not in decision.reason
    assert "\n" not in describe(accepted)
    assert is_valid_unicode(accepted.subject)
    mails = [item for item in accepted.items if item.kind == "smtp"]
    if decision.outcome == "deliver" and decision.recipients:
        routed, *unchanged = mails
        assert routed.recipients == decision.recipients
        assert RawMessage.parse(routed.data).body == message.body
    else:
        unchanged = mails
    whole = [envelope.rcpt_tos] if decision.outcome == "relay" else [decision.passthrough]
    assert [m.recipients for m in unchanged] == [r for r in whole if r]
    for item in unchanged:
        assert item.data.endswith(data)
        trace = RawMessage.parse(item.data[: len(item.data) - len(data)])
        assert [f.name for f in trace.fields] == ["received"]
    for item in accepted.items:
        if item.kind == "chat":
            assert ChatPost.from_json(item.data).title
    if decision.outcome == "hold":
        assert accepted.raw == data


@given(st.text(max_size=60), st.text(max_size=60), st.text(max_size=60))
def test_a_received_field_from_any_client_names_is_one_field_of_valid_utf8(
    helo: str, peer: str, recipient: str
) -> None:
    field = received_header(
        helo=helo, peer=peer, hostname="relay", queue_id="Q1", recipient=recipient, newline=b"\r\n"
    )

    parsed = RawMessage.parse(field + b"\r\nbody")
    assert [f.name for f in parsed.fields] == ["received"]
    assert parsed.body == b"body"
    codecs.decode(field, "utf-8")
