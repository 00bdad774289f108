"""docker-compose.yml, .env.example, the Dockerfile and the Makefile agree with the code they run.

Pure file checks: nothing here needs Docker. Each test names, in its docstring, the mistake in
the deployment files that it catches before a merchant's first ``docker compose up``.
"""

from __future__ import annotations

import ast
import fnmatch
import importlib
import json
import re
import shlex
import tomllib
from collections.abc import Mapping
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from celery import Celery
from packaging.requirements import Requirement
from pydantic import SecretStr, TypeAdapter
from starlette.routing import Route
from typer.testing import CliRunner

from billing.cli import app as cli_app
from billing.config import BillingSettings, FatoraSettings, load_settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
ENV_EXAMPLE = ROOT / ".env.example"
MAKEFILE = ROOT / "Makefile"
README = ROOT / "README.md"

CELERY_SERVICES = ("worker", "beat", "flower")
# The services that run the billing code on the real database, with every setting.
APP_SERVICES = ("migrate", "worker", "beat", "web")
EXPECTED_SERVICES = {"postgres", "redis", "migrate", "worker", "beat", "web", "flower", "sandbox"}
SETTINGS_CLASSES = (BillingSettings, FatoraSettings)
APP_ENV_PREFIXES = tuple(str(cls.model_config.get("env_prefix", "")) for cls in SETTINGS_CLASSES)
# What Flower is given: the broker it watches, its log format and its own login. Nothing that
# reads a card, charges one or opens the database.
FLOWER_ENV = {"BILLING_BROKER_URL", "BILLING_LOG_FORMAT", "FLOWER_BASIC_AUTH"}
NEVER_FOR_FLOWER = {
    "BILLING_TOKEN_KEY",
    "FATORA_API_KEY",
    "BILLING_DATABASE_URL",
    "POSTGRES_PASSWORD",
}
# Variables read outside billing/config.py, and the compose file's own.
OTHER_VARIABLES = {
    "BILLING_DEBUG",
    "PROMETHEUS_MULTIPROC_DIR",
    "POSTGRES_PASSWORD",
    "FLOWER_BASIC_AUTH",
}
SECRET_NAME = re.compile(r"(PASSWORD|SECRET|TOKEN_KEY|API_KEY|BASIC_AUTH|SMTP_URL|WEBHOOK_URL)")
# Compose interpolation: ``$$`` (a literal ``$``), ``${VAR}``, ``${VAR:-default}``,
# ``${VAR-default}``, ``${VAR:?error}``, ``${VAR?error}`` and ``$VAR``.
INTERPOLATION = re.compile(
    r"\$\$|\$\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
)


# -- helpers ---------------------------------------------------------------------------------


def load_compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict), "docker-compose.yml is not a mapping"
    return data


def services() -> dict[str, dict[str, Any]]:
    found = load_compose().get("services")
    assert isinstance(found, dict), "docker-compose.yml has no services"
    return found


def argv(command: str | list[str] | None) -> list[str]:
    if command is None:
        return []
    if isinstance(command, str):
        return shlex.split(command)
    return [str(part) for part in command]


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = (item.split("=", 1) for item in env)
        return {pair[0]: (pair[1] if len(pair) > 1 else "") for pair in pairs}
    return {str(key): str(value) for key, value in env.items()}


def interpolate(value: str, env: Mapping[str, str]) -> str:
    """``value`` as compose would pass it with ``env`` as the shell's environment and .env."""

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group("braced") or match.group("bare")
        op, arg = match.group("op"), match.group("arg") or ""
        given = env.get(name)
        missing = given is None or (given == "" and op is not None and op.startswith(":"))
        if op is not None and op.endswith("?") and missing:
            raise LookupError(f"compose refuses to start without {name}: {arg}")
        if op is not None and op.endswith("-") and missing:
            return arg
        return given or ""

    return INTERPOLATION.sub(one, value)


def variables_used() -> dict[str, set[str]]:
    """Each variable the compose file interpolates, with the operators it is used with
    (``""`` for a plain ``${VAR}``)."""
    found: dict[str, set[str]] = {}
    for match in INTERPOLATION.finditer(COMPOSE.read_text(encoding="utf-8")):
        name = match.group("braced") or match.group("bare")
        if name:
            found.setdefault(name, set()).add(match.group("op") or "")
    return found


def env_example() -> dict[str, str]:
    """The variables .env.example names, set (``VAR=value``) or commented out
    (``# VAR=value``), with the value shown."""
    named: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        match = re.fullmatch(r"#?\s*([A-Z][A-Z0-9_]*)=(.*)", line.strip())
        if match:
            named[match.group(1)] = match.group(2)
    return named


def settings_variables() -> dict[str, tuple[type[Any], Any]]:
    """Every environment variable the settings classes read: its type and its default."""
    return {
        f"{cls.model_config.get('env_prefix', '')}{name}".upper(): (
            field.annotation,
            field.default,
        )
        for cls in SETTINGS_CLASSES
        for name, field in cls.model_fields.items()
    }


def healthcheck(name: str) -> list[str]:
    check = services()[name].get("healthcheck") or {}
    assert not check.get("disable"), f"{name}: its health check is disabled"
    test = check.get("test")
    assert test, f"{name} has no health check"
    args = argv(test)
    assert args[0] in {"CMD", "CMD-SHELL"}, f"{name}: health check {args}"
    return args


def python_snippet(args: list[str]) -> str:
    """The code of a ``["CMD", "python", "-c", CODE]`` health check."""
    assert args[:3] == ["CMD", "python", "-c"], f"not a python health check: {args}"
    return args[3]


def option(args: list[str], *names: str) -> str | None:
    """The value of an option given as ``-X value``, ``--long value`` or ``--long=value``."""
    for index, arg in enumerate(args):
        for name in names:
            if arg == name and index + 1 < len(args):
                return args[index + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def celery_app_of(args: list[str]) -> Celery:
    """Import what ``celery -A <target>`` would load and return the Celery app it names."""
    target = option(args, "-A", "--app")
    assert target, f"celery command without -A: {args}"
    module_name, _, attribute = target.partition(":")
    module = importlib.import_module(module_name)
    found = getattr(module, attribute or "app", None)
    assert isinstance(found, Celery), f"{target} does not name a Celery app"
    return found


def declared_queues(celery_app: Celery) -> list[str]:
    return sorted(queue.name for queue in celery_app.conf.task_queues)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    joined: list[str] = []
    current = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        joined.append(current + line)
        current = ""
    if current:
        joined.append(current)
    pairs = []
    for line in joined:
        keyword, _, rest = line.partition(" ")
        pairs.append((keyword.upper(), rest.strip()))
    return pairs


def exec_form(arguments: str) -> list[str]:
    parsed = json.loads(arguments)
    assert isinstance(parsed, list) and all(isinstance(part, str) for part in parsed)
    return parsed


def cli_command_works(args: list[str]) -> None:
    """``billing <args> --help`` parses: the subcommands and the options named all exist."""
    result = CliRunner().invoke(cli_app, [*args, "--help"])
    shown = " ".join(args)
    assert result.exit_code == 0, f"`billing {shown}` is not a valid command:\n{result.output}"


# -- the compose file ------------------------------------------------------------------------


def test_expected_services_exist() -> None:
    """A renamed or dropped service (no beat: nothing is ever renewed) is caught here."""
    assert set(services()) >= EXPECTED_SERVICES


@pytest.mark.parametrize("name", CELERY_SERVICES)
def test_celery_commands_load_the_real_app(name: str) -> None:
    """Every Celery process names ``workers.app``, and that module imports and holds the app:
    a moved module would otherwise only show up as containers restarting in a loop."""
    args = argv(services()[name].get("command"))
    assert args[:1] == ["celery"], f"{name} does not run celery: {args}"
    assert option(args, "-A", "--app") == "workers.app"
    celery_app = celery_app_of(args)
    assert celery_app.main == "billing"
    assert name in args, f"the {name} service does not run `celery ... {name}`"


def test_worker_consumes_exactly_the_declared_queues() -> None:
    """A queue missing from ``-Q`` is a queue whose tasks pile up unseen (charges never taken,
    notifications never sent); a queue there that the app does not declare is a typo."""
    args = argv(services()["worker"]["command"])
    queues = option(args, "-Q", "--queues")
    assert queues, "the worker names no queues"
    listed = [part.strip() for part in queues.split(",") if part.strip()]
    assert len(listed) == len(set(listed)), f"a queue is listed twice: {listed}"
    assert sorted(listed) == declared_queues(celery_app_of(args))


def test_exactly_one_beat() -> None:
    """Two beats would fire every schedule twice; beat must never be scaled out."""
    beat = services()["beat"]
    replicas = (beat.get("deploy") or {}).get("replicas", 1)
    assert int(replicas) <= 1
    assert int(beat.get("scale", 1)) <= 1
    others = [
        name
        for name, service in services().items()
        if name != "beat" and "beat" in argv(service.get("command"))
    ]
    assert not others, f"a second beat runs in {others}"
    worker_args = argv(services()["worker"]["command"])
    assert "-B" not in worker_args and "--beat" not in worker_args, "the worker embeds a beat"


def test_depends_on_conditions_are_satisfiable() -> None:
    """A ``service_healthy`` on a service without a healthcheck, or a dependency on a service
    that does not exist, keeps the stack from ever starting."""
    all_services = services()
    checked = 0
    for name, service in all_services.items():
        depends = service.get("depends_on") or {}
        if isinstance(depends, list):
            depends = {target: {"condition": "service_started"} for target in depends}
        for target, spec in depends.items():
            assert target in all_services, f"{name} depends on unknown service {target}"
            condition = (spec or {}).get("condition", "service_started")
            assert condition in {
                "service_started",
                "service_healthy",
                "service_completed_successfully",
            }, f"{name}: unknown condition {condition}"
            if condition == "service_healthy":
                assert "healthcheck" in all_services[target], f"{target} has no healthcheck"
            if condition == "service_completed_successfully":
                restart = str(all_services[target].get("restart", "no"))
                assert restart in {"no", "on-failure"}, f"{target} is not a one-shot job"
            checked += 1
    assert checked


def test_app_services_wait_for_the_schema_and_the_broker() -> None:
    """Workers and beat start only once the migration succeeded and Redis answers: a worker on
    a missing schema fails every task it takes."""
    for name in ("worker", "beat"):
        depends = services()[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully"
        assert depends["redis"]["condition"] == "service_healthy"
    migrate = services()["migrate"]
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"


@pytest.mark.parametrize("name", sorted(EXPECTED_SERVICES - {"postgres", "redis"}))
def test_environment_names_known_settings(name: str) -> None:
    """Every BILLING_*/FATORA_* variable set in compose is a field of the settings classes:
    pydantic-settings ignores unknown variables, so a typo would silently fall back to the
    default (SQLite, or the public sample API key)."""
    env = environment(services()[name])
    known = set(settings_variables())
    app_vars = {key for key in env if key.startswith(APP_ENV_PREFIXES)}
    assert app_vars, f"{name} sets no billing settings"
    assert app_vars <= known, f"unknown settings in {name}: {sorted(app_vars - known)}"


@pytest.mark.parametrize("name", APP_SERVICES)
def test_every_setting_reaches_the_app_containers(name: str) -> None:
    """Compose passes only the variables it lists: a setting missing from the list is a value
    set in .env that the worker never sees (the gateway cap, the grace, the SMTP relay...)."""
    env = environment(services()[name])
    missing = set(settings_variables()) - set(env)
    assert not missing, f"{name} does not pass {sorted(missing)}"


def test_compose_defaults_are_the_code_defaults() -> None:
    """A ``${VAR:-default}`` whose default differs from the code's would make compose run on a
    value that no table in the documentation gives, or one the settings refuse."""
    known = settings_variables()
    env = environment(services()["worker"])
    checked = 0
    for key, value in env.items():
        match = re.fullmatch(r"\$\{" + key + r":-([^}]*)\}", value)
        if match is None:
            continue
        annotation, default = known[key]
        given = match.group(1)
        if default is None:
            assert given == "", f"{key}: unset in the code, {given!r} in compose"
            continue
        parsed = TypeAdapter(annotation).validate_python(given)
        if isinstance(default, SecretStr):
            assert isinstance(parsed, SecretStr)
            parsed, default = parsed.get_secret_value(), default.get_secret_value()
        assert parsed == default, f"{key}: {given!r} in compose, {default!r} in the code"
        checked += 1
    assert checked >= 20


@pytest.mark.parametrize("name", [*APP_SERVICES, "flower", "sandbox"])
def test_settings_load_from_the_compose_environment(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With only the required values in .env, what compose hands each container is read by the
    settings classes without an error (an empty string for a number would stop every worker)."""
    shell = {key: "x" for key, ops in variables_used().items() if ":?" in ops}
    shell["BILLING_PUBLIC_URL"] = "https://billing.shop.example"
    for key in list(settings_variables()):
        monkeypatch.delenv(key, raising=False)
    for key, value in environment(services()[name]).items():
        monkeypatch.setenv(key, interpolate(value, shell))
    for cls in SETTINGS_CLASSES:
        load_settings(cls)


def test_secrets_must_come_from_the_environment() -> None:
    """The token key, the Fatora key, the public URL and the passwords have no default in
    compose: ``${VAR:?...}`` makes ``docker compose up`` refuse to start without them instead
    of running on a shared key (or sending customers links to localhost)."""
    required = ("BILLING_TOKEN_KEY", "FATORA_API_KEY", "BILLING_PUBLIC_URL")
    for name in APP_SERVICES:
        env = environment(services()[name])
        for key in required:
            assert re.fullmatch(r"\$\{" + key + r":\?[^}]*\}", env[key]), f"{name}: {key}"
    flower = environment(services()["flower"])
    assert re.fullmatch(r"\$\{FLOWER_BASIC_AUTH:\?[^}]*\}", flower["FLOWER_BASIC_AUTH"])
    postgres = environment(services()["postgres"])
    assert re.fullmatch(r"\$\{POSTGRES_PASSWORD:\?[^}]*\}", postgres["POSTGRES_PASSWORD"])
    used = variables_used()
    for key in (*required, "FLOWER_BASIC_AUTH", "POSTGRES_PASSWORD"):
        assert used[key] == {":?"}, f"{key} is given a default somewhere: {used[key]}"
        with pytest.raises(LookupError, match=key):
            interpolate(f"${{{key}:?x}}", {key: ""})


def test_no_password_or_key_is_written_in_the_compose_file() -> None:
    """Every secret-looking variable of every service, and the password inside the database
    URL, comes from the environment: a literal one would be the same on every install, in git."""
    for name, service in services().items():
        for key, value in environment(service).items():
            if SECRET_NAME.search(key):
                assert value.startswith("${") and value.endswith("}"), f"{name}: {key} = {value}"
                assert ":-" not in value or value.endswith(":-}"), f"{name}: {key} has a default"
    for name in APP_SERVICES:
        url = environment(services()[name])["BILLING_DATABASE_URL"]
        assert "${POSTGRES_PASSWORD:?" in url, f"{name}: the database password is written out"


def test_urls_point_at_the_compose_services() -> None:
    """The database URL matches the postgres service's user, password and database, and the
    broker URL names the redis service: a mismatch is a worker that cannot connect."""
    shell = {name: "set" for name, ops in variables_used().items() if ":?" in ops}
    shell["POSTGRES_PASSWORD"] = "s3cret-Pass_word"
    all_services = services()
    env = {k: interpolate(v, shell) for k, v in environment(all_services["worker"]).items()}
    pg_env = {k: interpolate(v, shell) for k, v in environment(all_services["postgres"]).items()}
    database = urlsplit(env["BILLING_DATABASE_URL"])
    assert database.scheme.startswith("postgresql")
    assert database.hostname == "postgres"
    assert database.username == pg_env["POSTGRES_USER"]
    assert database.password == pg_env["POSTGRES_PASSWORD"] == "s3cret-Pass_word"
    assert database.path.lstrip("/") == pg_env["POSTGRES_DB"]
    broker = urlsplit(env["BILLING_BROKER_URL"])
    assert broker.scheme == "redis" and broker.hostname == "redis"
    flower = environment(all_services["flower"])
    assert flower["BILLING_BROKER_URL"] == env["BILLING_BROKER_URL"], "Flower watches elsewhere"


def test_billing_subcommands_exist() -> None:
    """``billing db upgrade`` and ``billing sandbox --host --port`` are real commands with
    real options: a renamed subcommand would make the migration step fail on deploy."""
    used = [argv(service.get("command")) for service in services().values()]
    billing_commands = [args[1:] for args in used if args[:1] == ["billing"]]
    assert ["db", "upgrade"] in billing_commands
    assert any(args[:1] == ["sandbox"] for args in billing_commands)
    for args in billing_commands:
        cli_command_works(args)


def test_worker_gets_time_to_finish_a_charge() -> None:
    """Docker's default 10 s grace would kill a worker mid-charge on every deploy."""
    grace = str(services()["worker"].get("stop_grace_period", "10s"))
    match = re.fullmatch(r"(\d+)(s|m)", grace)
    assert match, f"unreadable stop_grace_period {grace}"
    seconds = int(match.group(1)) * (60 if match.group(2) == "m" else 1)
    assert seconds >= 120


def test_flower_is_published_behind_basic_auth() -> None:
    """Flower shows task arguments and can revoke tasks: it is never exposed without a login,
    and its port is published on the host's loopback only (basic auth over plain HTTP)."""
    flower = services()["flower"]
    args = argv(flower["command"])
    assert option(args, "--port") == "5555"
    ports = [str(port) for port in flower.get("ports", [])]
    assert ports and all(port == "127.0.0.1:5555:5555" for port in ports), ports
    assert "FLOWER_BASIC_AUTH" in environment(flower)
    assert not any(arg.startswith("--basic-auth") for arg in args), "the login is in `ps`"
    assert "FLOWER_UNAUTHENTICATED_API" not in environment(flower)


def test_flower_reads_its_login_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compose hands Flower FLOWER_BASIC_AUTH only as an environment variable: Flower must take
    it as its ``--basic-auth`` (a renamed option would leave the dashboard open)."""
    from flower.command import apply_env_options
    from flower.options import options

    before = options.basic_auth
    monkeypatch.setenv("FLOWER_BASIC_AUTH", "ops:pw1,audit:pw2")
    try:
        apply_env_options()
        assert list(options.basic_auth) == ["ops:pw1", "audit:pw2"]
    finally:
        options.basic_auth = before


def test_flower_gets_no_secret_it_does_not_need() -> None:
    """Flower needs the broker and its login, nothing else: with the token key, the Fatora key
    or the database URL, whoever breaks into the dashboard's container could charge cards."""
    env = environment(services()["flower"])
    assert set(env) <= FLOWER_ENV, f"Flower is given {sorted(set(env) - FLOWER_ENV)}"
    assert not set(env) & NEVER_FOR_FLOWER
    assert "env_file" not in services()["flower"]
    text = json.dumps(services()["flower"])
    for name in NEVER_FOR_FLOWER:
        assert name not in text, f"Flower's service mentions {name}"


def test_sandbox_is_opt_in() -> None:
    """The sandbox answers any payment: it starts only with ``--profile sandbox``."""
    assert services()["sandbox"].get("profiles") == ["sandbox"]


def test_sandbox_accepts_the_key_the_workers_send() -> None:
    """Without FATORA_API_KEY the sandbox accepts only Fatora's public sample key: every call
    of the workers (which send the merchant's key) gets a 401, and collection pauses."""
    sandbox = environment(services()["sandbox"])
    worker = environment(services()["worker"])
    assert sandbox.get("FATORA_API_KEY") == worker["FATORA_API_KEY"]
    assert not {"BILLING_TOKEN_KEY", "BILLING_DATABASE_URL"} & set(sandbox)


# -- health checks -----------------------------------------------------------------------------


def test_every_long_running_service_has_a_health_check() -> None:
    """``docker compose ps`` shows a hung worker, a stalled beat or a dead dashboard as
    unhealthy only if it has a check; one-shot jobs (the migration), which others wait for to
    complete, are the only exception."""
    for name, service in services().items():
        if str(service.get("restart", "no")) == "no":
            assert "healthcheck" not in service or not service["healthcheck"].get("test")
            continue
        healthcheck(name)
        check = service["healthcheck"]
        for key in ("interval", "timeout", "retries"):
            assert key in check, f"{name}: health check without {key}"
    assert str(services()["migrate"].get("restart")) == "no"


def test_worker_health_check_pings_its_own_node() -> None:
    """``celery inspect ping -d celery@$HOSTNAME`` asks this container's worker, on the same
    app, through the broker; ``$$`` keeps compose from replacing the variable with the host's."""
    args = healthcheck("worker")
    assert args[0] == "CMD-SHELL"
    command = shlex.split(interpolate(args[1], {}))
    assert command[:1] == ["celery"] and option(command, "-A", "--app") == "workers.app"
    assert command[command.index("inspect") + 1] == "ping"
    assert option(command, "-d", "--destination") == "celery@$HOSTNAME"
    assert "-n" not in argv(services()["worker"]["command"]), "the node is not celery@hostname"
    assert "celery@$$HOSTNAME" in args[1], "compose would interpolate $HOSTNAME itself"


def test_beat_health_check_watches_its_schedule_file() -> None:
    """Beat writes its schedule file at start and every few minutes: the check looks at the
    file beat was told to use, and fails when it has not changed for far longer."""
    beat_args = argv(services()["beat"]["command"])
    schedule = option(beat_args, "-s", "--schedule")
    assert schedule and schedule.startswith("/home/billing/"), "beat's file is not named"
    code = python_snippet(healthcheck("beat"))
    ast.parse(code)
    assert f"'{schedule}*'" in code
    stale_after = int(re.search(r"<\s*(\d+)", code).group(1))  # type: ignore[union-attr]
    assert 300 <= stale_after <= 900


def test_flower_health_check_logs_in() -> None:
    """The check calls an authenticated API of Flower with the login compose gives it: healthy
    means up and answering its own login."""
    code = python_snippet(healthcheck("flower"))
    ast.parse(code)
    assert "FLOWER_BASIC_AUTH" in code and "Authorization" in code
    assert "127.0.0.1:5555/api/" in code


@pytest.mark.parametrize(("name", "route"), [("web", "/health"), ("sandbox", "/__sandbox/health")])
def test_http_health_checks_call_the_service_port(name: str, route: str) -> None:
    """``billing web`` and the sandbox are checked over HTTP on the port their command names."""
    args = argv(services()[name]["command"])
    code = python_snippet(healthcheck(name))
    ast.parse(code)
    assert f"http://127.0.0.1:{option(args, '--port')}{route}'" in code


def test_web_serves_its_health_route() -> None:
    from billing.web import create_app

    paths = {route.path for route in create_app().routes if isinstance(route, Route)}
    assert "/health" in paths


def test_database_and_broker_health_checks() -> None:
    assert "pg_isready" in " ".join(healthcheck("postgres"))
    assert healthcheck("redis")[1:] == ["redis-cli", "ping"]


# -- .env.example --------------------------------------------------------------------------------


def test_env_example_names_every_variable_compose_uses() -> None:
    """``cp .env.example .env`` is the documented start: a variable compose reads that it does
    not name is one an operator cannot know to set."""
    missing = set(variables_used()) - set(env_example())
    assert not missing, f".env.example does not name {sorted(missing)}"


def test_env_example_names_every_setting() -> None:
    """Every field of billing/config.py, and the variables read elsewhere, is named (and
    explained) in .env.example."""
    missing = (set(settings_variables()) | OTHER_VARIABLES) - set(env_example())
    assert not missing, f".env.example does not name {sorted(missing)}"
    unknown = set(env_example()) - set(settings_variables()) - OTHER_VARIABLES
    assert not unknown, f".env.example names what nothing reads: {sorted(unknown)}"


def test_env_example_holds_no_secret_and_blocks_compose_until_filled_in() -> None:
    """Copied as is, .env.example starts nothing: every required value is empty (compose's
    ``:?`` refuses it), and no key or password is given as an example."""
    named = env_example()
    for name, ops in variables_used().items():
        if ":?" in ops:
            assert named[name] == "", f"{name} has an example value in .env.example"
            with pytest.raises(LookupError):
                interpolate(f"${{{name}:?x}}", named)
    for name, value in named.items():
        if SECRET_NAME.search(name):
            assert value == "", f".env.example gives {name} a value"


# -- the Dockerfile --------------------------------------------------------------------------


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _installs_flower(extras: set[str]) -> bool:
    """Whether installing the project with ``extras`` installs Flower."""
    project = _pyproject()["project"]
    requirements = list(project["dependencies"])
    for extra in extras:
        requirements += project.get("optional-dependencies", {}).get(extra, [])
    return any(Requirement(text).name == "flower" for text in requirements)


def test_dockerfile_installs_the_project_with_flower() -> None:
    """The image installs the project, Flower included, on python:3.11-slim: otherwise the
    flower service has no ``celery flower`` command."""
    instructions = dockerfile_instructions()
    bases = [args for keyword, args in instructions if keyword == "FROM"]
    assert bases and all(base.split()[0] == "python:3.11-slim" for base in bases)
    name = _pyproject()["project"]["name"]
    installs = [
        args
        for keyword, args in instructions
        if keyword == "RUN" and re.search(rf"pip install .*{re.escape(name)}", args)
    ]
    assert installs, f"the image does not install {name}"
    extras = set(re.findall(rf"{re.escape(name)}\[([^\]]*)\]", installs[-1]))
    assert _installs_flower({e.strip() for group in extras for e in group.split(",")})


def test_make_installs_flower_and_the_readme_command_runs() -> None:
    """``make`` (and so ``make demo`` / ``make test``) installs Flower, and the README's
    ``celery -A workers.app flower`` names a command Celery has: it used to answer
    "No such command 'flower'"."""
    lines = [line for line in MAKEFILE.read_text(encoding="utf-8").splitlines() if "pip" in line]
    installs = [line for line in lines if re.search(r"pip install .*-e '\.(\[[^\]]*\])?'", line)]
    assert installs, "the Makefile does not install the project"
    extras = re.search(r"-e '\.(?:\[([^\]]*)\])?'", installs[-1])
    assert extras is not None
    assert _installs_flower({e.strip() for e in (extras.group(1) or "").split(",") if e.strip()})
    readme = README.read_text(encoding="utf-8")
    commands = re.findall(r"^celery (-A \S+ flower)\b", readme, flags=re.MULTILINE)
    assert commands == ["-A workers.app flower"], commands
    assert "flower" in {entry.name for entry in entry_points(group="celery.commands")}
    celery_app_of(["celery", "-A", "workers.app", "flower"])


def test_dockerfile_runs_as_non_root_without_secrets() -> None:
    """The final stage drops root, and no key or password is baked into the image's layers."""
    instructions = dockerfile_instructions()
    final_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    users = [args for keyword, args in instructions[final_from:] if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    secret = re.compile(r"(TOKEN_KEY|API_KEY|PASSWORD|SECRET|BASIC_AUTH)", re.IGNORECASE)
    for keyword, args in instructions:
        if keyword in {"ENV", "ARG"}:
            assert not secret.search(args), f"{keyword} {args} bakes a secret into the image"


def test_dockerfile_copies_only_what_exists_and_is_not_ignored() -> None:
    """Every file the build copies from the context exists and is not excluded by
    .dockerignore: either mistake fails the build (pyproject needs its README, for one)."""
    ignored = [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for keyword, args in dockerfile_instructions():
        if keyword != "COPY":
            continue
        if "--from=" in args:
            continue
        parts = [part for part in args.split() if not part.startswith("--")]
        for source in parts[:-1]:
            assert (ROOT / source).exists(), f"COPY {source}: no such file in the project"
            for pattern in ignored:
                assert not fnmatch.fnmatch(source.rstrip("/"), pattern.rstrip("/")), (
                    f"COPY {source} is excluded by .dockerignore ({pattern})"
                )


def test_dockerfile_default_command_is_consistent() -> None:
    """The image's CMD/ENTRYPOINT, if any, runs a real command in exec form (so Celery gets
    SIGTERM and shuts down warm): the same app, queues and CLI as the compose file."""
    commands = [
        exec_form(args)
        for keyword, args in dockerfile_instructions()
        if keyword in {"CMD", "ENTRYPOINT"}
    ]
    for args in commands:
        if args[:1] == ["celery"]:
            assert option(args, "-A", "--app") == "workers.app"
            celery_app = celery_app_of(args)
            queues = option(args, "-Q", "--queues")
            if queues is not None:
                assert sorted(queues.split(",")) == declared_queues(celery_app)
        elif args[:1] == ["billing"]:
            cli_command_works(args[1:])
        else:
            pytest.fail(f"unexpected image command {args}")
