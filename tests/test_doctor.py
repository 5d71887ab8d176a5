"""`hpo doctor` against real services: the SQLite and PostgreSQL study stores, a real MLflow
store, a listening and a closed port for Ray; each unreachable service is named."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from hpo.doctor import check_ray, check_store, check_tracking, diagnose

from .conftest import free_port


def test_a_reachable_setup_passes(sqlite_url, mlflow_store):
    checks = diagnose(sqlite_url, mlflow_store, None)
    assert all(c.ok for c in checks), checks


@pytest.mark.postgres
def test_the_postgresql_store_is_checked_with_a_real_connection(postgres_server_url):
    assert check_store(postgres_server_url).ok


def test_an_unreachable_postgresql_store_is_named_quickly():
    check = check_store(f"postgresql://nobody@127.0.0.1:{free_port()}/none")
    assert not check.ok and "OperationalError" in check.detail and check.seconds < 10


def test_missing_embedded_stores_are_not_created(tmp_path):
    assert check_store(f"sqlite:///{tmp_path / 'hpo.db'}").ok
    assert check_tracking(f"sqlite:///{tmp_path / 'mlflow.db'}").ok
    assert list(tmp_path.iterdir()) == []


def test_ray_address_is_a_tcp_check():
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        assert check_ray(f"127.0.0.1:{listening.getsockname()[1]}").ok
    assert not check_ray(f"ray://127.0.0.1:{free_port()}").ok
    assert check_ray(None).ok


def test_hpo_doctor_names_what_it_cannot_reach(sqlite_url, tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "hpo",
            "doctor",
            "--storage",
            sqlite_url,
            "--tracking-uri",
            f"http://127.0.0.1:{free_port()}",
            "--ray-address",
            f"127.0.0.1:{free_port()}",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert out.returncode == 1
    assert out.stderr.strip() == "error: cannot reach the MLflow tracking and the Ray"
    assert "ok  study store" in out.stdout and "UNREACHABLE  MLflow tracking" in out.stdout
