"""docker-compose.yml and Dockerfile: everything they name exists in the repository.

No Docker engine is needed: the files are parsed and every command, module, file and
setting they refer to is looked up here, so a rename in the code breaks this test, not
a deployment.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import re
import secrets
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "example"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
SETTINGS = EXAMPLE / "proj" / "settings.py"
IMAGE_WORKDIR = "/app/example"  # where the Dockerfile puts example/


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) pairs, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    steps = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, rest = line.partition(" ")
            steps.append((instruction.upper(), rest.strip()))
    return steps


def app_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services that run the project's image (built from the Dockerfile)."""
    return {name: svc for name, svc in compose["services"].items() if "build" in svc}


def argv(value: Any) -> list[str]:
    return list(value) if isinstance(value, list) else shlex.split(value)


def healthcheck_argv(service: dict[str, Any]) -> list[str]:
    test = service["healthcheck"]["test"]
    if isinstance(test, str):
        return shlex.split(test)
    kind, *rest = test
    if kind == "CMD-SHELL":
        return shlex.split(" ".join(rest))
    assert kind == "CMD", f"healthcheck test must start with CMD or CMD-SHELL, not {kind!r}"
    return rest


def settings_reads(name: str) -> bool:
    return re.search(rf"""os\.environ(\.get\(|\[)["']{re.escape(name)}["']""", SETTINGS.read_text()) is not None


def management_command_exists(name: str) -> bool:
    if (ROOT / "sisy_celery" / "management" / "commands" / f"{name}.py").is_file():
        return True
    return importlib.util.find_spec(f"django.core.management.commands.{name}") is not None


def resolve(dotted: str) -> Any:
    module, _, attr = dotted.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def check_command(words: list[str], where: str) -> None:
    """A command run inside the image (working directory example/) names only things that exist."""
    program, *args = words
    if program == "python" and args[:1] == ["manage.py"]:
        assert (EXAMPLE / "manage.py").is_file(), where
        assert management_command_exists(args[1]), f"{where}: no management command {args[1]!r}"
        if args[1] == "sisy_status":
            source = (ROOT / "sisy_celery/management/commands/sisy_status.py").read_text()
            for option in (a for a in args[2:] if a.startswith("--")):
                assert f'"{option}"' in source, f"{where}: sisy_status has no option {option}"
    elif program == "python" and args[:1] == ["-c"]:
        compile(args[1], where, "exec")
    elif program == "celery":
        assert args[:2] == ["-A", "proj"], f"{where}: celery must be given -A proj"
        assert (EXAMPLE / "proj" / "celery.py").is_file(), where
        assert re.search(r"^app = Celery\(", (EXAMPLE / "proj" / "celery.py").read_text(), re.M), where
        sub = args[2]
        assert sub in {"worker", "beat", "inspect"}, f"{where}: unexpected celery command {sub!r}"
        if "-S" in args:
            scheduler = resolve(args[args.index("-S") + 1])
            from celery.beat import Scheduler

            assert issubclass(scheduler, Scheduler), where
    elif program == "gunicorn":
        module = args[0].split(":")[0]
        path = EXAMPLE / (module.replace(".", "/") + ".py")
        assert path.is_file(), f"{where}: {path} does not exist"
        assert re.search(r"^application = ", path.read_text(), re.M), f"{where}: {path} defines no application"
    else:
        pytest.fail(f"{where}: unknown program {program!r}")


def test_services_and_replicas(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"db", "redis", "migrate", "web", "worker"} <= set(services)
    beats = [name for name, svc in app_services(compose).items() if "beat" in argv(svc["command"])]
    replicas = sum(services[name].get("deploy", {}).get("replicas", 1) for name in beats)
    assert replicas >= 2, "two beats must run at once"


def test_commands_name_what_exists(compose: dict[str, Any]) -> None:
    for name, service in app_services(compose).items():
        check_command(argv(service["command"]), f"service {name}")
        if "healthcheck" in service:
            check_command(healthcheck_argv(service), f"healthcheck of {name}")


def test_health_checks(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert healthcheck_argv(services["db"])[0] == "pg_isready"
    assert healthcheck_argv(services["redis"]) == ["redis-cli", "ping"]
    for name, service in app_services(compose).items():
        if "beat" in argv(service["command"]):
            # each beat container checks its own beat, not "some beat somewhere is alive"
            check = healthcheck_argv(service)
            assert check[:5] == ["python", "manage.py", "sisy_status", "--this-host", "--max-age"], name
            assert float(check[5]) > 0


def test_beats_use_the_database_scheduler(compose: dict[str, Any]) -> None:
    for name, service in app_services(compose).items():
        words = argv(service["command"])
        if "beat" in words:
            assert words[words.index("-S") + 1] == "sisy_celery.Scheduler", name


def test_environment_is_read_by_the_settings(compose: dict[str, Any]) -> None:
    for name, service in app_services(compose).items():
        for variable in service.get("environment", {}):
            assert settings_reads(variable), f"{name}: {variable} is not read by example/proj/settings.py"
        urls = service["environment"]
        assert urls["SISY_DATABASE_URL"].startswith("postgres://") and "@db:5432/" in urls["SISY_DATABASE_URL"]
        assert urls["CELERY_BROKER_URL"].startswith("redis://:") and "@redis:6379/" in urls["CELERY_BROKER_URL"]


def test_order_and_volumes(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert argv(services["migrate"]["command"])[:3] == ["python", "manage.py", "migrate"]
    assert services["migrate"].get("restart") == "no"
    for name, service in app_services(compose).items():
        if name != "migrate":
            assert service["depends_on"]["migrate"]["condition"] == "service_completed_successfully", name
        assert service["depends_on"]["db"]["condition"] == "service_healthy", name
    declared = set(compose["volumes"])
    used = {v.split(":")[0] for svc in services.values() for v in svc.get("volumes", [])}
    assert used <= declared and any(v.endswith("/var/lib/postgresql/data") for v in services["db"]["volumes"])


def test_worker_can_be_scaled(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker"]
    assert "container_name" not in worker and "ports" not in worker


def test_dockerfile(dockerfile: list[tuple[str, str]]) -> None:
    for instruction, args in dockerfile:
        if instruction == "COPY":
            *sources, _ = args.split()
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
    workdirs = [args for instruction, args in dockerfile if instruction == "WORKDIR"]
    assert workdirs[-1] == IMAGE_WORKDIR
    env = " ".join(args for instruction, args in dockerfile if instruction == "ENV")
    module = re.search(r"DJANGO_SETTINGS_MODULE=(\S+)", env).group(1)
    assert (EXAMPLE / (module.replace(".", "/") + ".py")).is_file()
    for variable in re.findall(r"(SISY_\w+)=", env):
        assert settings_reads(variable), variable
    installs = " ".join(args for instruction, args in dockerfile if instruction == "RUN" and "pip install" in args)
    assert "gunicorn" in installs, "gunicorn is installed in the image"
    assert '".[example]"' in installs, "the image installs the example extra"
    pyproject = (ROOT / "pyproject.toml").read_text()
    runtime = pyproject.split("dependencies = [", 1)[1].split("]", 1)[0]
    assert "gunicorn" not in runtime, "gunicorn is not a runtime dependency of the package"
    example_extra = re.search(r"^example = \[(.*?)\]", pyproject, re.M | re.S).group(1)
    assert "whitenoise" not in runtime and '"whitenoise' in example_extra, \
        "WhiteNoise comes with the example extra, not with the package"
    runs = [args for instruction, args in dockerfile if instruction == "RUN"]
    assert runs[-1] == "python manage.py collectstatic --noinput", "the image holds the collected static files"
    cmd = [args for instruction, args in dockerfile if instruction == "CMD"][-1]
    import json

    check_command(json.loads(cmd), "Dockerfile CMD")


# -- secure by default ------------------------------------------------------------------------------

SECRETS = ("DJANGO_SECRET_KEY", "POSTGRES_PASSWORD", "REDIS_PASSWORD")
# What `manage.py check --deploy` still reports with the compose settings: plain HTTP on the loopback
# port (README, Deployment: DJANGO_HTTPS=1 behind a TLS proxy turns them off).
HTTPS_ITEMS = {"security.W004", "security.W008", "security.W012", "security.W016"}
_VARIABLE = re.compile(r"\$\$|\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


class MissingVariable(Exception):
    """Compose stops with this message before it starts anything."""


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's substitution: ``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}`` (and ``-``/``?``), ``$$``."""
    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, operator, argument = match.groups()
        value = env.get(name)
        unset = value is None or (value == "" and operator in (":-", ":?"))
        if operator in ("?", ":?") and unset:
            raise MissingVariable(f"{name}: {argument}")
        if operator in ("-", ":-") and unset:
            return argument
        return value or ""
    return _VARIABLE.sub(substitute, text)


def secrets_env() -> dict[str, str]:
    return {name: secrets.token_urlsafe(50) for name in SECRETS}


def compose_with(env: dict[str, str]) -> dict[str, Any]:
    return yaml.safe_load(interpolate(COMPOSE.read_text(), env))


@pytest.mark.parametrize("missing", SECRETS)
def test_compose_refuses_to_start_without_each_secret(missing: str) -> None:
    env = secrets_env()
    del env[missing]
    with pytest.raises(MissingVariable, match=rf"{missing}: set {missing} \(see README, Deployment\)"):
        compose_with(env)
    with pytest.raises(MissingVariable):
        compose_with(dict(env, **{missing: ""}))
    assert f"{missing}=$(python3 -c" in (ROOT / "README.md").read_text(), "README shows how to make it"


def test_no_default_secrets_in_the_deployment_files(dockerfile: list[tuple[str, str]]) -> None:
    text = COMPOSE.read_text()
    for name in SECRETS:
        assert re.search(rf"\$\{{{name}:?-", text) is None, f"{name} has a default"
    assert "change-me" not in text
    for instruction, args in dockerfile:
        if instruction in ("ENV", "ARG"):
            assert not re.search(r"SECRET|PASSWORD|TOKEN", args, re.I), f"{instruction} {args}"


def test_every_service_gets_the_secrets_from_the_environment() -> None:
    env = secrets_env()
    services = compose_with(env)["services"]
    assert services["db"]["environment"]["POSTGRES_PASSWORD"] == env["POSTGRES_PASSWORD"]
    for name, service in app_services({"services": services}).items():
        variables = service["environment"]
        assert variables["DJANGO_SECRET_KEY"] == env["DJANGO_SECRET_KEY"], name
        assert f":{env['POSTGRES_PASSWORD']}@db:5432/" in variables["SISY_DATABASE_URL"], name
        assert variables["CELERY_BROKER_URL"] == f"redis://:{env['REDIS_PASSWORD']}@redis:6379/0", name
        assert variables["DJANGO_DEBUG"] == "0", name


def test_redis_requires_its_password() -> None:
    env = secrets_env()
    redis = compose_with(env)["services"]["redis"]
    assert redis["environment"]["REDISCLI_AUTH"] == env["REDIS_PASSWORD"]  # redis-cli (health check) reads it
    command = " ".join(redis["command"])
    assert '--requirepass "$REDISCLI_AUTH"' in command and env["REDIS_PASSWORD"] not in command


def test_only_the_web_port_is_published_and_only_on_the_loopback(compose: dict[str, Any]) -> None:
    published = {name: service["ports"] for name, service in compose["services"].items() if "ports" in service}
    assert set(published) == {"web"}
    assert all(str(port).startswith("127.0.0.1:") for port in published["web"]), published
    assert not any(service.get("network_mode") == "host" for service in compose["services"].values())


def web_environment(env: dict[str, str], var_dir: Path) -> dict[str, str]:
    """The environment of compose's web service (secrets from ``env``), files under ``var_dir``."""
    web = compose_with(env)["services"]["web"]["environment"]
    process_env = {key: value for key, value in os.environ.items() if not key.startswith(("DJANGO_", "SISY_"))}
    process_env.update({key: str(value) for key, value in web.items()},
                       DJANGO_SETTINGS_MODULE="proj.settings", PYTHONPATH=str(EXAMPLE), SISY_VAR_DIR=str(var_dir))
    return process_env


def deploy_check(env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """``manage.py check --deploy`` of the example project with the web service's environment."""
    return subprocess.run([sys.executable, str(EXAMPLE / "manage.py"), "check", "--deploy"],
                          env=web_environment(env, tmp_path), capture_output=True, text=True, timeout=120, cwd=tmp_path)


def test_check_deploy_with_the_compose_settings_reports_only_the_https_items(tmp_path: Path) -> None:
    done = deploy_check(secrets_env(), tmp_path)
    assert done.returncode == 0, done.stderr
    assert set(re.findall(r"\((\w+\.[WE]\d+)\)", done.stdout + done.stderr)) == HTTPS_ITEMS, done.stdout + done.stderr


def test_check_deploy_behind_https_reports_only_the_hsts_preload_choice(tmp_path: Path) -> None:
    # W021: SECURE_HSTS_PRELOAD asks browsers to hard-code HTTPS for the domain; that is the site's to choose.
    done = deploy_check(dict(secrets_env(), DJANGO_HTTPS="1"), tmp_path)
    assert done.returncode == 0, done.stderr
    assert set(re.findall(r"\((\w+\.[WE]\d+)\)", done.stdout + done.stderr)) == {"security.W021"}, done.stdout


def test_example_settings_refuse_to_run_without_a_secret_key_when_debug_is_off(tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("DJANGO_", "SISY_"))}
    env.update(DJANGO_DEBUG="0", PYTHONPATH=str(EXAMPLE), SISY_VAR_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", "import proj.settings"], env=env, capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    assert done.returncode != 0
    assert "ImproperlyConfigured: Set DJANGO_SECRET_KEY: with DJANGO_DEBUG=0 there is no default key" in done.stderr
