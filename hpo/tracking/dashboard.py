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
import threading
import time
import urllib.parse
import urllib.request
import webbrowser
from collections.abc import Callable
from pathlib import Path

from hpo.errors import HpoError
from hpo.running.store import redact, sqlite_path
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


def study_address(uri: str, base: str, study: str | None = None) -> tuple[str, str] | None:
    """``(study, address)`` of a study's trials in the dashboard at ``base``: the experiment's
    runs table filtered to trial runs (so they are not folded under the study's run) and sorted
    by the first objective, best first. ``study`` names it; by default the study whose run
    started last. ``None`` when the store holds no study."""
    from mlflow import MlflowClient

    from hpo.tracking.runs import ROLE_TAG, STUDY_TAG

    client = MlflowClient(uri)
    experiments = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in experiments], filter_string=f"tags.`{ROLE_TAG}` = 'study'",
                              order_by=["attributes.start_time DESC"], max_results=1000) if experiments else []
    if study is not None:
        runs = [r for r in runs if r.data.tags.get(STUDY_TAG) == study]
        if not runs:
            raise HpoError(f"no study {study!r} in the MLflow store {redact(uri)}")
    if not runs:
        return None
    run = runs[0]
    metric, _, direction = run.data.params.get("objectives", "").split(",")[0].partition(" (")
    query = {"searchFilter": f"tags.`{ROLE_TAG}` = 'trial'"}
    if metric:
        query |= {"orderByKey": f"metrics.`objective.{metric.strip()}`",
                  "orderByAsc": "true" if direction.startswith("minimize") else "false"}
    return (run.data.tags.get(STUDY_TAG, run.info.run_name),
            f"{base}/#/experiments/{run.info.experiment_id}/runs?{urllib.parse.urlencode(query, quote_via=urllib.parse.quote)}")


def server_environment() -> dict[str, str]:
    """The server's environment: MLflow's job runner and its queue consumers (seven processes for
    GenAI jobs this service does not use) are left off."""
    return {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def serve(uri: str | None, *, host: str = "127.0.0.1", port: int = 5000, study: str | None = None,
          open_browser: bool = False, announce: Callable[[str], None] = print,
          warn: Callable[[str], None] = print) -> None:
    """Run the dashboard for tracking store ``uri`` (default: ``$MLFLOW_TRACKING_URI``, else
    ``sqlite:///mlflow.db``) until Ctrl-C or SIGTERM, and print the address of a study's trials
    (:func:`study_address`); for a tracking server, just say where it is. Every process the
    server started is gone when this returns."""
    uri = tracking_uri(uri)
    if uri.startswith(("http://", "https://")):
        state = "answering" if healthy(uri) else "NOT answering"
        announce(f"the tracking URI is a server; its dashboard is {redact(uri)} ({state})")
        found = study_address(uri, uri.rstrip("/"), study) if state == "answering" else None
        if found:
            announce(f"study {found[0]}: {found[1]}")
        return
    if (db := sqlite_path(uri)) is not None and not db.exists():
        raise HpoError(f"no MLflow store at {uri}: run a study first (`hpo submit …`) or pass --tracking-uri")
    if not _port_free(host, port):
        raise HpoError(f"port {port} on {host} is in use: choose another with --port")
    if not is_loopback(host):
        warn(f"binding to {host}: the dashboard has no login and anyone who can reach this host can "
             "read and delete runs; use 127.0.0.1 and an SSH tunnel, or the basic-auth server in docker/")
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    found = study_address(uri, url, study)
    log = tempfile.NamedTemporaryFile(prefix="hpo-ui-", suffix=".log", delete=False)  # noqa: SIM115
    process: subprocess.Popen | None = None
    try:
        process = subprocess.Popen(server_command(uri, host, port), stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True, env=server_environment())
        _wait_until_up(process, url, Path(log.name))
        address = found[1] if found else url
        announce(f"MLflow dashboard for {redact(uri)}: {address}  (Ctrl-C to stop)")
        if found:
            announce(f"(study {found[0]}: its trials, best first; all experiments at {url})")
        if open_browser:
            webbrowser.open(address)
        process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        if process is not None:
            stop(process)
        log.close()
        Path(log.name).unlink(missing_ok=True)


def stop(process: subprocess.Popen, grace: float = 5.0) -> None:
    """Stop a server started in its own session and every process in it: SIGTERM to the group,
    up to ``grace`` seconds for it to exit, then SIGKILL to whatever is left of the group (uvicorn
    workers can outlive their parent). Ctrl-C and SIGTERM are ignored meanwhile, so a second
    Ctrl-C cannot leave processes behind."""
    main = threading.current_thread() is threading.main_thread()
    held = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(grace)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    finally:
        for s, handler in held.items():
            signal.signal(s, handler)


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
