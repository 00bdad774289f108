"""docker-compose.yml and the Dockerfile agree with the code they run.

Pure file checks: nothing here needs Docker. Each test names, in its docstring, the mistake in
the deployment files that it catches before a merchant's first ``docker compose up``.
"""

from __future__ import annotations

import fnmatch
import importlib
import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from celery import Celery
from typer.testing import CliRunner

from billing.cli import app as cli_app
from billing.config import BillingSettings, FatoraSettings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

CELERY_SERVICES = ("worker", "beat", "flower")
APP_SERVICES = ("migrate", "worker", "beat", "flower")
EXPECTED_SERVICES = {"postgres", "redis", "migrate", "worker", "beat", "flower", "sandbox"}
SETTINGS_CLASSES = (BillingSettings, FatoraSettings)
APP_ENV_PREFIXES = tuple(str(cls.model_config.get("env_prefix", "")) for cls in SETTINGS_CLASSES)


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


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_environment_names_known_settings(name: str) -> None:
    """Every BILLING_*/FATORA_* variable set in compose is a field of the settings classes:
    pydantic-settings ignores unknown variables, so a typo would silently fall back to the
    default (SQLite, or the public sample API key)."""
    env = environment(services()[name])
    known = {
        f"{cls.model_config.get('env_prefix', '')}{field}".upper()
        for cls in SETTINGS_CLASSES
        for field in cls.model_fields
    }
    app_vars = {key for key in env if key.startswith(APP_ENV_PREFIXES)}
    assert app_vars, f"{name} sets no billing settings"
    assert app_vars <= known, f"unknown settings in {name}: {sorted(app_vars - known)}"
    required = {"BILLING_DATABASE_URL", "BILLING_BROKER_URL", "BILLING_TOKEN_KEY", "FATORA_API_KEY"}
    assert required <= app_vars


def test_secrets_must_come_from_the_environment() -> None:
    """The token key and the Fatora key have no default in compose: ``${VAR:?...}`` makes
    ``docker compose up`` refuse to start without them instead of running on a shared key."""
    for name in APP_SERVICES:
        env = environment(services()[name])
        for key in ("BILLING_TOKEN_KEY", "FATORA_API_KEY"):
            assert re.fullmatch(r"\$\{" + key + r":\?[^}]*\}", env[key]), f"{name}: {key}"
    flower = environment(services()["flower"])
    assert re.fullmatch(r"\$\{FLOWER_BASIC_AUTH:\?[^}]*\}", flower["FLOWER_BASIC_AUTH"])


def test_urls_point_at_the_compose_services() -> None:
    """The database URL matches the postgres service's user, password and database, and the
    broker URL names the redis service: a mismatch is a worker that cannot connect."""
    all_services = services()
    env = environment(all_services["worker"])
    database = urlsplit(env["BILLING_DATABASE_URL"])
    pg_env = environment(all_services["postgres"])
    assert database.scheme.startswith("postgresql")
    assert database.hostname == "postgres"
    assert database.username == pg_env["POSTGRES_USER"]
    assert database.password == pg_env["POSTGRES_PASSWORD"]
    assert database.path.lstrip("/") == pg_env["POSTGRES_DB"]
    broker = urlsplit(env["BILLING_BROKER_URL"])
    assert broker.scheme == "redis" and broker.hostname == "redis"


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
    """Flower shows task arguments and can revoke tasks: it is never exposed without a login."""
    flower = services()["flower"]
    args = argv(flower["command"])
    assert option(args, "--port") == "5555"
    assert any(str(port).endswith("5555") for port in flower.get("ports", []))
    assert "FLOWER_BASIC_AUTH" in environment(flower)


def test_sandbox_is_opt_in() -> None:
    """The sandbox answers any payment: it starts only with ``--profile sandbox``."""
    assert services()["sandbox"].get("profiles") == ["sandbox"]


# -- the Dockerfile --------------------------------------------------------------------------


def test_dockerfile_installs_the_project_with_flower() -> None:
    """The image installs ``.[flower]`` on python:3.11-slim, and pyproject declares that extra:
    otherwise the flower service has no ``celery flower`` command."""
    instructions = dockerfile_instructions()
    bases = [args for keyword, args in instructions if keyword == "FROM"]
    assert bases and all(base.split()[0] == "python:3.11-slim" for base in bases)
    runs = " ".join(args for keyword, args in instructions if keyword == "RUN")
    assert "[flower]" in runs
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "flower" in pyproject["project"]["optional-dependencies"]


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
