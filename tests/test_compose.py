"""docker-compose.yml and Dockerfile: everything they name exists in the repository.

No Docker engine is needed: the files are parsed and every command, module, file and
setting they refer to is looked up here, so a rename in the code breaks this test, not
a deployment.
"""
from __future__ import annotations

import importlib
import importlib.util
import re
import shlex
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
            assert healthcheck_argv(service)[:4] == ["python", "manage.py", "sisy_status", "--max-age"], name
            assert float(healthcheck_argv(service)[4]) > 0


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
        assert urls["CELERY_BROKER_URL"].startswith("redis://redis:6379/")


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
    pyproject = (ROOT / "pyproject.toml").read_text()
    runtime = pyproject.split("dependencies = [", 1)[1].split("]", 1)[0]
    assert "gunicorn" not in runtime, "gunicorn is not a runtime dependency of the package"
    cmd = [args for instruction, args in dockerfile if instruction == "CMD"][-1]
    import json

    check_command(json.loads(cmd), "Dockerfile CMD")
