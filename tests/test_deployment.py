"""The deployment files keep their promises, without a Docker engine.

Every ``mail2alert ...`` the Dockerfile, build.sh, run.sh, selftest.sh and
examples/mail2alert.service would run is read out of them and handed to the real argument
parser, so a renamed command or option breaks here and not on a server. The scripts also run
for real against a fake ``docker`` on PATH that records what it is asked to do: that is how
the argument checks, the check-before-replace order and the passed environment are verified.
The healthcheck's Python is run against a real mail2alert's /readyz on loopback.
"""

from __future__ import annotations

import http.server
import io
import json
import os
import re
import shlex
import stat
import subprocess
import sys
import threading
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest

from mail2alert.cli import build_parser
from mail2alert.testing import CaptureServer, free_port
from tests.helpers import relay

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("build.sh", "run.sh", "selftest.sh")
UNIT = "examples/mail2alert.service"
COMMANDS = {"serve", "check", "coverage", "route", "test", "queue", "capture"}
PASSED_ENV = ("GOUSER", "GOPASS", "GOTOKEN", "LOGLEVEL", "SLACK_TOKEN", "SLACK_URL")
IMAGE = "example.test/mail2alert:under-test"
CONFIG_MOUNT = "/etc/mail2alert"
COMMAND_PREFIXES = {"!", "then", "else", "do", "exec", "command", "time", "sudo", "env"}


@dataclass(frozen=True)
class Invocation:
    """One ``mail2alert`` command line found in a deployment file."""

    source: str
    args: tuple[str, ...]

    @property
    def command(self) -> str:
        return next((a for a in self.args if a in COMMANDS), " ".join(self.args))

    def __str__(self) -> str:
        return f"{self.source}: mail2alert {shlex.join(self.args)}"


# -- reading the files ---------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (INSTRUCTION, rest), continuation lines joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending += line[:-1] + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            keyword, _, rest = pending.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
            pending = ""
    return instructions


def instruction_args(rest: str) -> list[str]:
    """Exec form (a JSON list) as it is; shell form split as the shell would."""
    if rest.startswith("["):
        value = json.loads(rest)
        assert isinstance(value, list)
        return [str(v) for v in value]
    return shlex.split(rest)


def last(keyword: str) -> str | None:
    found = [rest for kw, rest in dockerfile() if kw == keyword]
    return found[-1] if found else None


def healthcheck_command() -> list[str]:
    """The HEALTHCHECK's command, after its --options and the CMD keyword."""
    rest = last("HEALTHCHECK") or ""
    words = rest.split()
    while words and words[0].startswith("--"):
        words.pop(0)
    assert words, "HEALTHCHECK has no command"
    assert words[0].upper() == "CMD", f"HEALTHCHECK must run a command, not {words[0]}"
    return instruction_args(rest[rest.upper().index("CMD") + 3 :].strip())


def logical_lines(text: str) -> list[str]:
    """Shell lines with backslash continuations joined."""
    return text.replace("\\\n", " ").splitlines()


def shell_words(line: str) -> list[str]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        return list(lexer)
    except ValueError:  # an unbalanced quote in a line that is not a command we look for
        return []


def is_operator(word: str) -> bool:
    return bool(word) and all(c in "();<>|&" for c in word)


def concrete(word: str) -> str | None:
    """A shell word as the CLI would see it: "${array[@]}" is dropped, $VAR becomes X."""
    if re.fullmatch(r"\$\{\w+\[[@*]\]\}", word):
        return None
    return re.sub(r"\$(\{[^}]*\}|\w+)", "X", word)


def arguments_after(words: list[str], start: int) -> tuple[str, ...]:
    """The words after ``start`` up to the end of the simple command."""
    args: list[str] = []
    for i in range(start + 1, len(words)):
        if is_operator(words[i]):
            if args and args[-1].isdigit() and words[i][0] in "<>":
                args.pop()  # the 2 of 2>&1
            break
        word = concrete(words[i])
        if word is not None:
            args.append(word)
    return tuple(args)


def runs_image(words: list[str], i: int) -> bool:
    """Whether words[i] is the image of a ``docker run`` (whose entrypoint is mail2alert)."""
    if words[i] not in ("$IMAGE", "${IMAGE}"):
        return False
    dockers = [j for j in range(i) if words[j] == "docker"]
    return bool(dockers) and words[dockers[-1] + 1] == "run"


def calls_mail2alert(words: list[str], i: int) -> bool:
    """Whether words[i] runs mail2alert directly, in command position."""
    word = words[i]
    if word != "mail2alert" and not re.fullmatch(r"[\w./-]*/mail2alert", word):
        return False
    return i == 0 or is_operator(words[i - 1]) or words[i - 1] in COMMAND_PREFIXES


def script_invocations(name: str) -> list[Invocation]:
    """``docker run ... "$IMAGE" ARGS`` and direct ``mail2alert ARGS`` calls."""
    found = []
    for line in logical_lines((ROOT / name).read_text()):
        words = shell_words(line)
        for i in range(len(words)):
            if runs_image(words, i) or calls_mail2alert(words, i):
                found.append(Invocation(name, arguments_after(words, i)))
    return found


def dockerfile_invocations() -> list[Invocation]:
    entrypoint = instruction_args(last("ENTRYPOINT") or "[]")
    cmd = instruction_args(last("CMD") or "[]")
    found = []
    if entrypoint[:1] == ["mail2alert"]:
        found.append(Invocation("Dockerfile ENTRYPOINT+CMD", tuple(entrypoint[1:] + cmd)))
    health = healthcheck_command() if last("HEALTHCHECK") else []
    for i, word in enumerate(health):
        if Path(word).name == "mail2alert":
            found.append(Invocation("Dockerfile HEALTHCHECK", arguments_after(health, i)))
    return found


def unit_directives() -> list[tuple[str, str]]:
    pairs = []
    for raw in (ROOT / UNIT).read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            pairs.append((key.strip(), value.strip()))
    return pairs


def unit_invocations() -> list[Invocation]:
    found = []
    for key, value in unit_directives():
        if key in ("ExecStartPre", "ExecStart"):
            words = shlex.split(value.lstrip("-@:+!"))
            if words and Path(words[0]).name == "mail2alert":
                found.append(Invocation(f"{UNIT} {key}", tuple(words[1:])))
    return found


def all_invocations() -> list[Invocation]:
    found = dockerfile_invocations() + unit_invocations()
    for name in SCRIPTS:
        found += script_invocations(name)
    return found


def parser_refusal(args: tuple[str, ...] | list[str]) -> str | None:
    """None when the CLI accepts ``args`` (--help and --version exit 0); else what it said."""
    said = io.StringIO()
    try:
        with redirect_stdout(said), redirect_stderr(said):
            build_parser().parse_args(list(args))
    except SystemExit as exc:
        if exc.code not in (0, None):
            return said.getvalue().strip() or f"exit {exc.code}"
    return None


# -- the scripts against a fake docker -----------------------------------------------------

FAKE_DOCKER = """\
#!{python}
import json, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_DOCKER_LOG"], "a") as log:
    log.write(json.dumps(args) + "\\n")
if os.environ.get("FAKE_DOCKER_FAIL_ON") in args:
    sys.exit(1)
if args[:2] == ["container", "inspect"]:
    sys.exit(0 if os.environ.get("FAKE_DOCKER_RUNNING") else 1)
"""


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str
    calls: list[list[str]]

    def runs(self) -> list[list[str]]:
        return [c for c in self.calls if c[:1] == ["run"]]

    def mail2alert_args(self) -> list[list[str]]:
        """What mail2alert got in each ``docker run`` of the image (ENTRYPOINT is mail2alert)."""
        return [c[c.index(IMAGE) + 1 :] for c in self.runs() if IMAGE in c]


RunScript = Callable[..., Ran]


@pytest.fixture
def run_script(tmp_path: Path) -> RunScript:
    """Run a deployment script with a recording fake ``docker`` first on PATH."""
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    docker = bin_dir / "docker"
    docker.write_text(FAKE_DOCKER.format(python=sys.executable))
    docker.chmod(0o755)
    log = tmp_path / "docker-calls.jsonl"

    def run(name: str, *args: str, **env: str) -> Ran:
        log.write_text("")
        clean = {k: v for k, v in os.environ.items() if k not in PASSED_ENV}
        clean = {k: v for k, v in clean.items() if k not in ("IMAGE", "ENV_FILE", "BIND")}
        clean.update(
            PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            FAKE_DOCKER_LOG=str(log),
            IMAGE=IMAGE,
            **env,
        )
        done = subprocess.run(
            ["bash", str(ROOT / name), *args],
            capture_output=True,
            text=True,
            env=clean,
            timeout=30,
            check=False,
        )
        calls = [json.loads(line) for line in log.read_text().splitlines()]
        return Ran(done.returncode, done.stdout, done.stderr, calls)

    return run


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "conf"
    directory.mkdir()
    (directory / "configuration.yml").write_text("remote-smtp: localhost:8025\nmanagers: []\n")
    return directory


# -- every mail2alert invocation is one the CLI accepts ------------------------------------


@pytest.mark.parametrize("invocation", all_invocations(), ids=str)
def test_every_mail2alert_invocation_in_the_deployment_files_is_accepted_by_the_cli(
    invocation: Invocation,
) -> None:
    refusal = parser_refusal(invocation.args)
    assert refusal is None, f"{invocation}\nis refused by mail2alert's parser:\n{refusal}"


def test_the_invocations_found_are_the_ones_each_file_is_meant_to_make() -> None:
    found = {(i.source, i.command) for i in all_invocations()}
    assert found == {
        ("Dockerfile ENTRYPOINT+CMD", "serve"),
        ("build.sh", "--version"),
        ("run.sh", "check"),
        ("run.sh", "serve"),
        ("selftest.sh", "check"),
        ("selftest.sh", "coverage"),
        (f"{UNIT} ExecStartPre", "check"),
        (f"{UNIT} ExecStart", "serve"),
    }


@pytest.mark.parametrize(
    ("script", "args"),
    [("build.sh", ()), ("run.sh", ("CONFIG",)), ("selftest.sh", ("CONFIG",))],
    ids=SCRIPTS,
)
def test_what_each_script_really_passes_to_mail2alert_is_accepted_by_the_cli(
    run_script: RunScript, config_dir: Path, script: str, args: tuple[str, ...]
) -> None:
    ran = run_script(script, *(str(config_dir) if a == "CONFIG" else a for a in args))
    assert ran.returncode == 0, ran.stderr
    assert ran.mail2alert_args(), f"{script} never ran the image"
    for argv in ran.mail2alert_args():
        refusal = parser_refusal(argv)
        assert refusal is None, f"{script}: mail2alert {shlex.join(argv)}\n{refusal}"


# -- the Dockerfile ------------------------------------------------------------------------


def test_the_image_is_built_in_two_python_3_11_slim_stages() -> None:
    bases = [rest.split()[0] for kw, rest in dockerfile() if kw == "FROM"]
    assert bases == ["python:3.11-slim", "python:3.11-slim"]


def test_the_dockerfile_needs_no_buildkit() -> None:
    """Debian's docker.io builds with the classic builder: no ``# syntax=`` directive, no
    ``RUN --mount``, no ``COPY --link``, no heredocs."""
    text = (ROOT / "Dockerfile").read_text()
    assert not re.search(r"^#\s*syntax\s*=", text, re.MULTILINE | re.IGNORECASE)
    for kw, rest in dockerfile():
        assert not (kw == "RUN" and rest.startswith("--mount")), rest
        assert not (kw in ("COPY", "ADD") and "--link" in rest), rest
        assert "<<" not in rest, rest


def test_the_runtime_stage_gets_the_built_venv_and_runs_its_mail2alert() -> None:
    stages = " ".join(f"{kw} {rest}" for kw, rest in dockerfile()).split("FROM ")
    assert "COPY --from=build /opt/mail2alert /opt/mail2alert" in stages[-1]
    env = " ".join(rest for kw, rest in dockerfile() if kw == "ENV")
    assert "PATH=/opt/mail2alert/bin:$PATH" in env.split()


def test_the_runtime_stage_installs_no_compilers() -> None:
    stages = " ".join(f"{kw} {rest}" for kw, rest in dockerfile()).split("FROM ")
    runtime = stages[-1]
    for tool in ("build-essential", "gcc", "g++", "clang", "apt-get install"):
        assert tool not in runtime, f"the final stage mentions {tool!r}"


def test_the_container_runs_as_a_non_root_user() -> None:
    user = last("USER")
    assert user, "no USER: the container would run as root"
    assert user.split(":")[0] not in ("root", "0")


def test_the_configuration_path_is_set_in_the_image() -> None:
    env = " ".join(rest for kw, rest in dockerfile() if kw == "ENV")
    assert "MAIL2ALERT_CONFIGURATION=/etc/mail2alert/configuration.yml" in env.split()


def test_the_data_dir_is_a_volume_and_the_working_directory() -> None:
    volumes = [v for kw, rest in dockerfile() if kw == "VOLUME" for v in instruction_args(rest)]
    assert "/var/lib/mail2alert" in volumes
    assert last("WORKDIR") == "/var/lib/mail2alert"


def test_the_image_exposes_the_smtp_port_and_runs_mail2alert_serve() -> None:
    assert last("EXPOSE") == "1025"
    assert instruction_args(last("ENTRYPOINT") or "") == ["mail2alert"]
    assert instruction_args(last("CMD") or "") == ["serve"]


def test_the_healthcheck_is_a_python_one_liner_on_readyz_at_the_default_http_address() -> None:
    command = healthcheck_command()
    assert command[:2] == ["python", "-c"]
    assert "http://127.0.0.1:9025/readyz" in command[2]
    assert command[2].count("9025") == 1


def healthcheck_on(port: int) -> subprocess.CompletedProcess[str]:
    code = healthcheck_command()[2].replace("9025", str(port))
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False
    )


def test_the_healthcheck_passes_when_mail2alert_is_ready(
    tmp_path: Path, upstream: CaptureServer
) -> None:
    with relay(tmp_path, upstream, []) as mail2alert:
        port = int(mail2alert.service.http_url.rsplit(":", 1)[1])
        done = healthcheck_on(port)
    assert done.returncode == 0, done.stderr


def test_the_healthcheck_fails_when_readyz_answers_503() -> None:
    class NotReady(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(503)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotReady) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            done = healthcheck_on(server.server_address[1])
        finally:
            server.shutdown()
    assert done.returncode != 0
    assert "503" in done.stderr


def test_the_healthcheck_fails_when_nothing_listens() -> None:
    assert healthcheck_on(free_port()).returncode != 0


def dockerignored(path: str) -> bool:
    """Whether Docker leaves ``path`` out of the build context (last matching pattern wins)."""
    excluded = False
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]").replace(r"\[", "[")
        regex = regex.replace(r"\]", "]").replace(r"\-", "-")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(re.fullmatch(regex, p) for p in prefixes):
            excluded = not negate
    return excluded


@pytest.mark.parametrize(
    "path", ["pyproject.toml", "README.md", "src/mail2alert/cli.py", "src/mail2alert/py.typed"]
)
def test_the_build_context_holds_what_the_wheel_needs(path: str) -> None:
    assert not dockerignored(path)


@pytest.mark.parametrize(
    "path",
    [
        ".git/HEAD",
        ".venv/bin/python",
        "tests/test_config.py",
        "mail2alert-data/outbox.sqlite",
        "src/mail2alert/__pycache__/cli.cpython-311.pyc",
        "src/mail2alert.egg-info/PKG-INFO",
    ],
)
def test_the_build_context_leaves_out_everything_else(path: str) -> None:
    assert dockerignored(path)


# -- the shell scripts ---------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS)
def test_each_script_is_valid_bash(script: str) -> None:
    done = subprocess.run(
        ["bash", "-n", str(ROOT / script)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_each_script_stops_on_the_first_error(script: str) -> None:
    lines = [line.strip() for line in (ROOT / script).read_text().splitlines()]
    assert "set -euo pipefail" in lines


@pytest.mark.parametrize("script", SCRIPTS)
def test_each_script_is_executable(script: str) -> None:
    assert (ROOT / script).stat().st_mode & stat.S_IXUSR


def test_build_sh_tags_the_image_named_by_image(run_script: RunScript) -> None:
    ran = run_script("build.sh")
    assert ran.returncode == 0, ran.stderr
    build = next(c for c in ran.calls if c[:1] == ["build"])
    assert build[build.index("--tag") + 1] == IMAGE


@pytest.mark.parametrize("script", ["run.sh", "selftest.sh"])
@pytest.mark.parametrize(
    "args",
    [(), ("DIR", "extra"), ("/no/such/directory",), ("FILE",), ("EMPTY_DIR",)],
    ids=["no argument", "two arguments", "missing", "a file", "no configuration.yml"],
)
def test_a_bad_config_dir_argument_is_a_usage_error_before_any_docker_call(
    run_script: RunScript, config_dir: Path, tmp_path: Path, script: str, args: tuple[str, ...]
) -> None:
    (tmp_path / "empty").mkdir()
    stand_ins = {
        "DIR": str(config_dir),
        "FILE": str(config_dir / "configuration.yml"),
        "EMPTY_DIR": str(tmp_path / "empty"),
    }
    ran = run_script(script, *(stand_ins.get(a, a) for a in args))
    assert ran.returncode == 2
    assert f"usage: {script} CONFIG_DIR" in ran.stderr
    assert ran.calls == []


def test_run_sh_checks_the_configuration_before_starting_the_service(
    run_script: RunScript, config_dir: Path
) -> None:
    ran = run_script("run.sh", str(config_dir))
    assert ran.returncode == 0, ran.stderr
    assert ran.mail2alert_args() == [["check"], ["serve"]]
    check, serve = ran.runs()
    assert "--rm" in check
    assert "--detach" in serve


def test_run_sh_leaves_the_running_container_alone_when_the_check_fails(
    run_script: RunScript, config_dir: Path
) -> None:
    ran = run_script(
        "run.sh", str(config_dir), FAKE_DOCKER_FAIL_ON="check", FAKE_DOCKER_RUNNING="1"
    )
    assert ran.returncode == 1
    assert "configuration invalid" in ran.stderr
    assert [c[0] for c in ran.calls] == ["run"]


def test_run_sh_stops_the_old_container_gracefully_before_replacing_it(
    run_script: RunScript, config_dir: Path
) -> None:
    ran = run_script("run.sh", str(config_dir), FAKE_DOCKER_RUNNING="1")
    assert ran.returncode == 0, ran.stderr
    assert [c[0] for c in ran.calls] == ["run", "container", "stop", "rm", "run"]
    assert ran.calls[2] == ["stop", "--time", "30", "mail2alert-app"]


def option_values(call: list[str], option: str) -> list[str]:
    return [call[i + 1] for i, word in enumerate(call) if word == option]


def test_run_sh_mounts_the_config_read_only_in_both_runs(
    run_script: RunScript, config_dir: Path
) -> None:
    ran = run_script("run.sh", str(config_dir))
    for call in ran.runs():
        assert f"{config_dir.resolve()}:{CONFIG_MOUNT}:ro" in option_values(call, "--volume")


def test_run_sh_passes_the_environment_to_both_runs(
    run_script: RunScript, config_dir: Path
) -> None:
    ran = run_script("run.sh", str(config_dir))
    for call in ran.runs():
        assert set(PASSED_ENV) <= set(option_values(call, "--env"))


def test_run_sh_passes_an_env_file_to_both_runs_when_env_file_is_set(
    run_script: RunScript, config_dir: Path, tmp_path: Path
) -> None:
    env_file = tmp_path / "mail2alert.env"
    env_file.write_text("GOPASS=secret\nCHAT_HOOK=https://chat.example/hook\n")
    ran = run_script("run.sh", str(config_dir), ENV_FILE=str(env_file))
    assert ran.returncode == 0, ran.stderr
    for call in ran.runs():
        assert option_values(call, "--env-file") == [str(env_file)]


def test_run_sh_runs_a_named_restartable_container_on_loopback_with_a_data_volume(
    run_script: RunScript, config_dir: Path
) -> None:
    serve = run_script("run.sh", str(config_dir)).runs()[-1]
    assert option_values(serve, "--name") == ["mail2alert-app"]
    assert option_values(serve, "--restart") == ["unless-stopped"]
    assert option_values(serve, "--publish") == ["127.0.0.1:1025:1025"]
    assert "mail2alert-data:/var/lib/mail2alert" in option_values(serve, "--volume")
    assert not any(word.startswith("--network") for word in serve)


def test_run_sh_publishes_on_the_address_given_in_bind(
    run_script: RunScript, config_dir: Path
) -> None:
    serve = run_script("run.sh", str(config_dir), BIND="0.0.0.0:2525").runs()[-1]
    assert option_values(serve, "--publish") == ["0.0.0.0:2525:1025"]


def test_run_sh_never_pulls_an_image(run_script: RunScript, config_dir: Path) -> None:
    for call in run_script("run.sh", str(config_dir)).runs():
        assert "--pull=never" in call


def test_selftest_sh_runs_check_online_then_coverage_on_the_read_only_config(
    run_script: RunScript, config_dir: Path
) -> None:
    ran = run_script("selftest.sh", str(config_dir))
    assert ran.returncode == 0, ran.stderr
    assert ran.mail2alert_args() == [["check", "--online"], ["coverage"]]
    for call in ran.runs():
        assert f"{config_dir.resolve()}:{CONFIG_MOUNT}:ro" in option_values(call, "--volume")
        assert set(PASSED_ENV) <= set(option_values(call, "--env"))


def test_selftest_sh_fails_without_running_coverage_when_the_check_fails(
    run_script: RunScript, config_dir: Path
) -> None:
    ran = run_script("selftest.sh", str(config_dir), FAKE_DOCKER_FAIL_ON="check")
    assert ran.returncode != 0
    assert ran.mail2alert_args() == [["check", "--online"]]


# -- the systemd unit ----------------------------------------------------------------------


def test_the_unit_checks_the_configuration_before_it_starts() -> None:
    directives = unit_directives()
    keys = [k for k, _ in directives]
    assert keys.index("ExecStartPre") < keys.index("ExecStart")
    pre = dict(directives)["ExecStartPre"]
    assert shlex.split(pre)[1:] == ["check", "--config", "/etc/mail2alert/configuration.yml"]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("Type", "simple"),
        ("User", "mail2alert"),
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
        ("KillSignal", "SIGTERM"),
        ("TimeoutStopSec", "30"),
        ("Restart", "on-failure"),
        ("StateDirectory", "mail2alert"),
        ("WorkingDirectory", "/var/lib/mail2alert"),
        ("EnvironmentFile", "-/etc/mail2alert/env"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("ReadWritePaths", "/var/lib/mail2alert"),
    ],
)
def test_the_unit_sets(key: str, value: str) -> None:
    assert (key, value) in unit_directives()


# -- the debug console ---------------------------------------------------------------------

DEPLOYMENT_FILES = ("Dockerfile", *SCRIPTS, "docker-config.sh", UNIT)


def test_no_deployment_file_starts_the_debug_console() -> None:
    """``--monitor`` is a Python shell with every secret in reach: a deployment never has one."""
    for invocation in all_invocations():
        assert not any(arg.startswith("--monitor") for arg in invocation.args), str(invocation)
    for name in DEPLOYMENT_FILES:
        text = (ROOT / name).read_text()
        assert "--monitor" not in text, name
        assert not re.search(r"\b5010[1-3]\b", text), f"{name} names a debug console port"


def test_run_sh_serves_without_the_debug_console_and_publishes_only_the_smtp_port(
    run_script: RunScript, config_dir: Path
) -> None:
    ran = run_script("run.sh", str(config_dir), BIND="0.0.0.0:25")
    assert ran.returncode == 0, ran.stderr
    assert ran.mail2alert_args() == [["check"], ["serve"]]
    for call in ran.runs():
        assert all(p.endswith(":1025") for p in option_values(call, "--publish")), call
