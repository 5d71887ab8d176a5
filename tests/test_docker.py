"""docker/ without a Docker engine: the compose file validates (Debian's docker-compose 1.29,
`docker-compose config`), is secure by default (loopback ports, no passwords in it, health
checks, GPU reservations), and its MLflow service command really starts a basic-auth MLflow
server on PostgreSQL when run here with sh."""

from __future__ import annotations

import base64
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import sqlalchemy
import yaml

from hpo.tracking.dashboard import healthy

DOCKER = Path(__file__).resolve().parents[1] / "docker"
COMPOSE = DOCKER / "compose.yaml"
COMPOSE_CLI = shutil.which("docker-compose")


def _services() -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"]


needs_compose = pytest.mark.skipif(COMPOSE_CLI is None, reason="no docker-compose (apt-get install docker-compose)")


def _compose_config(tmp_path: Path, env: str, flag: str) -> subprocess.CompletedProcess:
    """``docker-compose config FLAG`` on the compose file with ``env`` as its .env file."""
    env_file = tmp_path / ".env"
    env_file.write_text(env)
    return subprocess.run(
        [COMPOSE_CLI, "--env-file", str(env_file), "-f", str(COMPOSE), "config", flag], capture_output=True, text=True
    )


@needs_compose
def test_the_compose_file_validates_with_docker_compose(tmp_path):
    out = _compose_config(tmp_path, "POSTGRES_PASSWORD=only-for-this-test\n", "--quiet")
    assert out.returncode == 0, out.stderr
    services = _compose_config(tmp_path, "POSTGRES_PASSWORD=only-for-this-test\n", "--services").stdout.split()
    assert set(services) >= {"postgres", "mlflow", "ray-head", "ray-worker"}


@needs_compose
def test_compose_refuses_to_start_without_a_database_password(tmp_path):
    out = _compose_config(tmp_path, "POSTGRES_USER=hpo\n", "--quiet")
    assert out.returncode != 0 and "set POSTGRES_PASSWORD in docker/.env" in out.stderr


def test_published_ports_bind_to_loopback_unless_opened():
    for name, service in _services().items():
        for port in service.get("ports", []):
            assert re.fullmatch(r"\$\{[A-Z]+_BIND:-127\.0\.0\.1\}:\d+:\d+", port), f"{name}: {port}"


def test_no_password_is_written_in_docker_files():
    for name, service in _services().items():
        environment = service.get("environment", {})
        for key, value in environment.items():
            if "PASSWORD" in key or "SECRET" in key:
                assert str(value).startswith("${"), f"{name}: {key} is not taken from the environment"
    for path in [COMPOSE, DOCKER / "Dockerfile", *DOCKER.glob("initdb/*")]:
        for secret in re.findall(r"://[^:/\s]+:([^@\s]+)@", path.read_text()):
            assert secret.startswith(("${", "$$")), f"{path.name}: a URL with a literal password"
    for line in (DOCKER / ".env.example").read_text().splitlines():
        key, _, value = line.partition("=")
        if ("PASSWORD" in key or "SECRET" in key) and not key.startswith("#"):
            assert value == "", f".env.example gives {key} a value"


def test_services_restart_check_their_health_and_workers_reserve_gpus():
    services = _services()
    for name in ("postgres", "mlflow", "ray-head", "ray-worker"):
        assert services[name]["restart"] == "unless-stopped"
        assert services[name]["healthcheck"]["test"]
    devices = services["ray-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
    assert "ports" not in services["ray-worker"], "workers scale with --scale: no fixed host ports"


def test_the_dockerfile_copies_what_exists_and_installs_the_project():
    text = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE=pytorch/pytorch:[\d.]+-cuda[\d.]+-cudnn\d+-runtime$", text, re.M)
    for source in re.findall(r"^COPY (\S+)", text, re.M):
        assert (DOCKER.parent / source).exists(), source
    assert "ARG EXTRAS=vision,cluster" in text and '".[${EXTRAS}]"' in text and "USER hpo" in text


def test_the_image_has_rays_client_when_the_head_serves_it():
    """The Ray head serves ray:// (--ray-client-server-port), which plain `ray` cannot: it then
    crash-loops with "Ray Client requires pip package ray[client]". The image installs the
    cluster extra, and the extra brings ray[client]."""
    command = _services()["ray-head"]["command"]
    assert "--ray-client-server-port" in (command if isinstance(command, str) else " ".join(command))
    assert "client" in _ray_extras()
    text = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"^ARG EXTRAS=\S*\bcluster\b", text, re.M) and '".[${EXTRAS}]"' in text


def _ray_extras() -> set[str]:
    """The extras of Ray that the image's ``cluster`` extra installs."""
    import tomllib

    from packaging.requirements import Requirement

    extras = tomllib.loads((DOCKER.parent / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    return {extra for req in map(Requirement, extras["cluster"]) if req.name == "ray" for extra in req.extras}


def test_the_head_serves_the_jobs_api_that_drivers_are_submitted_to():
    """`hpo submit --cluster` needs the head's dashboard to serve the Jobs API (only with
    ray[default]), the study store and MLflow in the head's environment (a job's driver inherits
    it), a driver slot resource for the queue, a start timeout past Ray's 15 minutes, and the
    image's hpo by absolute path."""
    head = _services()["ray-head"]
    assert "default" in _ray_extras()
    assert """--resources='{"hpo_driver": ${HPO_DRIVERS:-2}}'""" in head["command"]
    env = head["environment"]
    assert env["HPO_STORAGE"].startswith("postgresql://") and env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert int(env["RAY_JOB_START_TIMEOUT_SECONDS"]) >= 24 * 3600
    assert any(port.endswith(":8265:8265") for port in head["ports"])
    text = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"^ENV HPO_BIN=(/\S+)$", text, re.M).group(1) in text.split("ENV HPO_BIN")[0]


def test_a_ray_client_address_without_rays_client_is_one_line(monkeypatch):
    """Plain ``ray`` without its client extra (grpc): ``sys.modules["grpc"] = None`` makes the
    import fail as it does there."""
    pytest.importorskip("ray")
    monkeypatch.setitem(sys.modules, "grpc", None)
    from hpo.errors import HpoError
    from hpo.running.ray_executor import connect

    with pytest.raises(HpoError, match=r"Ray client address.*pip install 'dropout-hpo\[cluster\]'"):
        connect("ray://127.0.0.1:1")


def _mlflow_command() -> str:
    return _services()["mlflow"]["command"][0]


@pytest.mark.postgres
def test_the_mlflow_service_command_serves_basic_auth_on_postgresql(postgres_database, tmp_path):
    """Runs the compose file's MLflow command with sh (no container): the admin password comes
    from the environment and requests without it are refused."""
    base = postgres_database()  # a server to create the service's own databases on
    url = sqlalchemy.engine.make_url(base)
    admin = sqlalchemy.create_engine(base, isolation_level="AUTOCOMMIT")
    suffix = url.database
    with admin.connect() as conn:
        for db in ("mlflow", "mlflow_auth"):
            conn.execute(sqlalchemy.text(f'CREATE DATABASE "{suffix}_{db}"'))
    admin.dispose()
    script = (
        _mlflow_command()
        .replace("$$", "$")
        .replace("@postgres:5432", f"@{url.host}:{url.port or 5432}")
        .replace('"$db/mlflow"', f'"$db/{suffix}_mlflow"')
        .replace("%s/mlflow_auth", f"%s/{suffix}_mlflow_auth")
        .replace("/mlartifacts", str(tmp_path / "artifacts"))
        .replace("--port 5000", "--port 5099")
        .replace("--workers 2", "--workers 1")
        .replace("127.0.0.1:5000", "127.0.0.1:5099")
    )
    env = {
        **os.environ,
        "POSTGRES_USER": url.username,
        "POSTGRES_PASSWORD": url.password or "",
        "MLFLOW_AUTH": "1",
        "MLFLOW_ADMIN_USER": "admin",
        "MLFLOW_AUTH_ADMIN_PASSWORD": "s3cret-for-test",
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "csrf-key-for-test",
        "MLFLOW_ALLOWED_HOSTS": "",
    }
    if not url.password:  # trust auth: no password in the URL
        script = script.replace(":$POSTGRES_PASSWORD@", "@")
    server = subprocess.Popen(
        ["sh", "-c", script],
        env=env,
        cwd=tmp_path,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "server.log", "wb"),
    )
    try:
        deadline = time.monotonic() + 120
        while not healthy("http://127.0.0.1:5099"):
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.5)
        search = "http://127.0.0.1:5099/api/2.0/mlflow/experiments/search?max_results=1"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(search, timeout=10)
        assert refused.value.code == 401
        request = urllib.request.Request(
            search, headers={"Authorization": "Basic " + base64.b64encode(b"admin:s3cret-for-test").decode()}
        )
        assert urllib.request.urlopen(request, timeout=10).status == 200
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)


def test_the_mlflow_service_refuses_auth_without_an_admin_password(tmp_path):
    env = {
        **os.environ,
        "POSTGRES_USER": "hpo",
        "POSTGRES_PASSWORD": "x",
        "MLFLOW_AUTH": "1",
        "MLFLOW_ADMIN_USER": "admin",
        "MLFLOW_AUTH_ADMIN_PASSWORD": "",
        "MLFLOW_ALLOWED_HOSTS": "",
    }
    out = subprocess.run(
        ["sh", "-c", _mlflow_command().replace("$$", "$")], env=env, capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 1 and "set MLFLOW_ADMIN_PASSWORD" in out.stderr
