"""``hpo ui``: the MLflow dashboard on the study's tracking store.

On a laptop the tracking store is the embedded ``mlflow.db``, which nothing serves, so ``hpo ui``
starts ``mlflow server`` on it, bound to loopback; on a cluster the tracking URI is already a
server and its address is the dashboard.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from hpo.errors import HpoError
from hpo.running.study import redact, sqlite_path
from hpo.tracking.runs import TrackingError, artifacts_dir, tracking_uri

#: Seconds to wait for ``mlflow server`` to answer its health check (it migrates the database
#: the first time).
START_TIMEOUT = 90.0


def server_command(uri: str, host: str, port: int) -> list[str]:
    """The ``mlflow server`` command serving tracking store ``uri`` with one worker process."""
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
               "--host", host, "--port", str(port), "--workers", "1"]
    if (artifacts := artifacts_dir(uri)) is not None:
        command += ["--artifacts-destination", str(artifacts)]
    return command


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host).is_loopback
    return False


def healthy(url: str, timeout: float = 2.0) -> bool:
    """Whether an MLflow server answers ``/health`` at ``url``."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def serve(uri: str | None, *, host: str = "127.0.0.1", port: int = 5000,
          announce: Callable[[str], None] = print, warn: Callable[[str], None] = print) -> None:
    """Run the dashboard for tracking store ``uri`` (default: ``$MLFLOW_TRACKING_URI``, else
    ``sqlite:///mlflow.db``) until Ctrl-C; for a tracking server, just say where it is."""
    uri = tracking_uri(uri)
    if uri.startswith(("http://", "https://")):
        state = "answering" if healthy(uri) else "NOT answering"
        announce(f"the tracking URI is a server; its dashboard is {redact(uri)} ({state})")
        return
    if (db := sqlite_path(uri)) is not None and not db.exists():
        raise HpoError(f"no MLflow store at {uri}: run a study first (`hpo submit …`) or pass --tracking-uri")
    if not _port_free(host, port):
        raise HpoError(f"port {port} on {host} is in use: choose another with --port")
    if not is_loopback(host):
        warn(f"binding to {host}: the dashboard has no login and anyone who can reach this host can "
             "read and delete runs; use 127.0.0.1 and an SSH tunnel, or the basic-auth server in docker/")
    log = tempfile.NamedTemporaryFile(prefix="hpo-ui-", suffix=".log", delete=False)  # noqa: SIM115
    process = subprocess.Popen(server_command(uri, host, port), stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    try:
        _wait_until_up(process, url, Path(log.name))
        announce(f"MLflow dashboard for {redact(uri)}: {url}  (Ctrl-C to stop)")
        process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop(process)
        log.close()
        Path(log.name).unlink(missing_ok=True)


def stop(process: subprocess.Popen, timeout: float = 10.0) -> None:
    """Stop a server started in its own session, with its worker processes (uvicorn's workers
    outlive a killed parent)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _wait_until_up(process: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            lines = log.read_text(errors="replace").strip().splitlines()
            raise TrackingError(f"mlflow server exited ({process.returncode}): {lines[-1] if lines else 'no output'}")
        if healthy(url, timeout=1.0):
            return
        time.sleep(0.3)
    raise TrackingError(f"mlflow server did not answer at {url} within {START_TIMEOUT:.0f} s")
