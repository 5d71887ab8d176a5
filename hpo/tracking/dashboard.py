"""``hpo ui``: the MLflow dashboard on the study's tracking store, or optuna-dashboard on the
study store (``--viewer optuna``).

On a laptop the tracking store is the embedded ``mlflow.db``, which nothing serves, so ``hpo ui``
starts ``mlflow server`` on it, bound to loopback; on a cluster the tracking URI is already a
server and its address is the dashboard. optuna-dashboard (an optional extra) reads the study
store itself, so it shows a study even when MLflow tracking was off.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hpo.errors import HpoError
from hpo.running.store import redact, sqlite_path
from hpo.tracking.runs import TrackingError, artifacts_dir, tracking_uri

if TYPE_CHECKING:
    from hpo.running.study import StudyHandle

#: Seconds to wait for ``mlflow server`` to answer its health check (it migrates the database
#: the first time).
START_TIMEOUT = 90.0
#: Where ``hpo ui`` serves an embedded MLflow store, and optuna-dashboard, unless told otherwise.
DEFAULT_PORT, OPTUNA_PORT = 5000, 8080


def server_command(uri: str, host: str, port: int) -> list[str]:
    """The ``mlflow server`` command serving tracking store ``uri`` with one worker process."""
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        uri,
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        "1",
    ]
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
    return _answers(f"{url.rstrip('/')}/health", timeout)


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


@dataclass(frozen=True)
class StudyAddress:
    """Where a study's trials are in the dashboard: ``table`` opens on the runs table, and
    ``charts``, with the study's preset view (:mod:`hpo.tracking.view`), on its charts."""

    study: str
    table: str
    charts: str | None = None


def runs_address(
    base: str, experiment_id: str, study: str, objective: str, direction: str, has_view: bool = True
) -> StudyAddress:
    """The address of a study's trial runs in the dashboard at ``base``: with the study's preset
    view where its experiment has one (``has_view``) that the installed MLflow reads, else the
    runs table filtered to trial runs (so they are not folded under the study's run) and sorted
    by ``objective``, best first."""
    from hpo.tracking import view
    from hpo.tracking.runs import OBJECTIVE_PREFIX, ROLE_TAG

    page = f"{base}/#/experiments/{experiment_id}/runs?"
    if has_view and view.supported():
        key = view.view_key(study)
        return StudyAddress(study, page + view.view_query(key), page + view.view_query(key, charts=True))
    # MLflow 3's UI picks the runs table or its GenAI pages from this parameter, else from the
    # browser's last choice, else GenAI; no tag or server setting decides it.
    query = {"workflowType": "machine_learning", "searchFilter": f"tags.`{ROLE_TAG}` = 'trial'"}
    if objective:
        query |= {
            "orderByKey": f"metrics.`{OBJECTIVE_PREFIX}{objective}`",
            "orderByAsc": "true" if direction == "minimize" else "false",
        }
    return StudyAddress(study, page + urllib.parse.urlencode(query, quote_via=urllib.parse.quote))


def study_address(uri: str, base: str, study: str | None = None) -> StudyAddress | None:
    """Where a study's trials are in the dashboard at ``base`` (:func:`runs_address`). ``study``
    names it; by default the study whose run started last. ``None`` when the store holds no
    study."""
    from mlflow import MlflowClient

    from hpo.tracking import view
    from hpo.tracking.runs import ROLE_TAG, STUDY_TAG

    client = MlflowClient(uri)
    experiments = client.search_experiments()
    runs = (
        client.search_runs(
            [e.experiment_id for e in experiments],
            filter_string=f"tags.`{ROLE_TAG}` = 'study'",
            order_by=["attributes.start_time DESC"],
            max_results=1000,
        )
        if experiments
        else []
    )
    if study is not None:
        runs = [r for r in runs if r.data.tags.get(STUDY_TAG) == study]
        if not runs:
            raise HpoError(f"no study {study!r} in the MLflow store {redact(uri)}")
    if not runs:
        return None
    run = runs[0]
    name = run.data.tags.get(STUDY_TAG, run.info.run_name)
    metric, _, direction = run.data.params.get("objectives", "").split(",")[0].partition(" (")
    tags = client.get_experiment(run.info.experiment_id).tags
    return runs_address(
        base,
        run.info.experiment_id,
        name,
        metric.strip(),
        direction.rstrip(")"),
        has_view=view.TAG_PREFIX + view.view_key(name) in tags,
    )


def _about_view(found: StudyAddress, announce: Callable[[str], None]) -> None:
    from importlib import metadata

    from hpo.tracking import view

    if found.charts:
        announce(f"its dropout parameters against the objective, as charts: {found.charts}")
    elif not view.supported():
        checked = ", ".join(f"{major}.{minor}" for major, minor in view.CHECKED)
        announce(
            f"(no preset columns or charts: the view is written for MLflow {checked}, and this is MLflow "
            f"{metadata.version('mlflow')})"
        )


def planned_address(handle: StudyHandle) -> tuple[str, bool] | None:
    """The address of the study's trials once the dashboard serves its MLflow store, and whether
    that takes ``hpo ui`` (an embedded store, served at ``hpo ui``'s default port) rather than a
    tracking server. ``None`` before the study reached MLflow."""
    from hpo.tracking.runs import PARENT_ATTR

    parent = handle.study.user_attrs.get(PARENT_ATTR) or {}
    if "experiment_id" not in parent:
        return None
    uri = str(parent.get("uri", ""))
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else f"http://127.0.0.1:{DEFAULT_PORT}"
    first = handle.spec.objective[0]
    return runs_address(
        base, parent["experiment_id"], handle.name, first.metric, first.direction
    ).table, not uri.startswith(("http://", "https://"))


def server_environment() -> dict[str, str]:
    """The server's environment: MLflow's job runner and its queue consumers (seven processes for
    GenAI jobs this service does not use) are left off."""
    return {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def serve(
    uri: str | None,
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    study: str | None = None,
    open_browser: bool = False,
    announce: Callable[[str], None] = print,
    warn: Callable[[str], None] = print,
) -> None:
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
            announce(f"study {found.study}: {found.table}")
            _about_view(found, announce)
        return
    if (db := sqlite_path(uri)) is not None and not db.exists():
        raise HpoError(f"no MLflow store at {uri}: run a study first (`hpo submit …`) or pass --tracking-uri")
    url = _bound(
        host,
        port,
        warn,
        "the dashboard has no login and anyone who can reach this host can read and "
        "delete runs; use 127.0.0.1 and an SSH tunnel, or the basic-auth server in docker/",
    )
    found = study_address(uri, url, study)
    address = found.table if found else url

    def on_up() -> None:
        _opened(f"MLflow dashboard for {redact(uri)}: {address}  (Ctrl-C to stop)", address, open_browser, announce)
        if found:
            announce(f"(study {found.study}: its trials, best first; all experiments at {url})")
            _about_view(found, announce)

    _run_server(
        server_command(uri, host, port),
        lambda: healthy(url, timeout=1.0),
        "mlflow server",
        url,
        server_environment(),
        on_up,
    )


def optuna_dashboard_command(storage: str, host: str, port: int) -> list[str]:
    """The ``optuna-dashboard`` command serving study store ``storage`` (its own WSGI server): the
    script installed beside this Python, else the one on ``PATH``."""
    beside = Path(sys.executable).with_name("optuna-dashboard")
    script = str(beside) if beside.exists() else shutil.which("optuna-dashboard")
    if script is None:
        raise HpoError(
            "optuna-dashboard is not installed: pip install 'dropout-hpo[dashboard]' (or pip install optuna-dashboard)"
        )
    return [script, storage, "--host", host, "--port", str(port), "--server", "wsgiref"]


def optuna_study_path(storage: str, study: str | None) -> str:
    """The path of a study's page in optuna-dashboard: ``study`` by name, by default the study
    created last; the dashboard's study list when the store holds none."""
    from hpo.running.store import open_storage

    rdb = open_storage(storage)
    names = [s.study_name for s in rdb.get_all_studies()]
    if study is not None and study not in names:
        raise HpoError(
            f"no study {study!r} in {redact(storage)}"
            + (f" (studies: {', '.join(sorted(names))})" if names else " (the store has no studies)")
        )
    ids = {name: rdb.get_study_id_from_name(name) for name in ([study] if study else names)}
    return f"/dashboard/studies/{max(ids.values())}" if ids else "/dashboard"


def serve_optuna(
    storage: str,
    *,
    host: str = "127.0.0.1",
    port: int = OPTUNA_PORT,
    study: str | None = None,
    open_browser: bool = False,
    announce: Callable[[str], None] = print,
    warn: Callable[[str], None] = print,
) -> None:
    """Run optuna-dashboard on study store ``storage`` until Ctrl-C or SIGTERM and print the
    address of a study's page. A ``sqlite:///`` store must exist first: optuna-dashboard would
    leave an empty file behind and exit with "no such table"."""
    command = optuna_dashboard_command(storage, host, port)
    if (db := sqlite_path(storage)) is not None and not db.is_file():
        raise HpoError(f"no study store at {storage}: run a study first (`hpo submit …`) or pass --storage")
    url = _bound(
        host,
        port,
        warn,
        "optuna-dashboard has no login and anyone who can reach this host can read, "
        "annotate and delete studies; use 127.0.0.1 and an SSH tunnel",
    )
    address = url + optuna_study_path(storage, study)
    _run_server(
        command,
        lambda: _answers(f"{url}/api/meta"),
        "optuna-dashboard",
        url,
        os.environ.copy(),
        on_up=lambda: _opened(
            f"optuna-dashboard for {redact(storage)}: {address}  (Ctrl-C to stop)", address, open_browser, announce
        ),
    )


def _bound(host: str, port: int, warn: Callable[[str], None], exposed: str) -> str:
    """The address a server bound to ``host:port`` answers at, after refusing a port in use and
    warning (``exposed``: why) when ``host`` is not loopback."""
    if not _port_free(host, port):
        raise HpoError(f"port {port} on {host} is in use: choose another with --port")
    if not is_loopback(host):
        warn(f"binding to {host}: {exposed}")
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"


def _opened(line: str, address: str, open_browser: bool, announce: Callable[[str], None]) -> None:
    announce(line)
    if open_browser:
        webbrowser.open(address)


def _answers(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


def _run_server(
    command: list[str], up: Callable[[], bool], what: str, url: str, env: dict[str, str], on_up: Callable[[], None]
) -> None:
    """Start ``command`` in its own session (its output kept in a temporary log), wait until
    ``up``, call ``on_up``, then wait for Ctrl-C or SIGTERM; every process it started is gone when
    this returns."""
    log = tempfile.NamedTemporaryFile(prefix="hpo-ui-", suffix=".log", delete=False)
    process: subprocess.Popen | None = None
    try:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        _wait_until_up(process, up, what, url, Path(log.name))
        on_up()
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


def _wait_until_up(process: subprocess.Popen, up: Callable[[], bool], what: str, url: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            lines = log.read_text(errors="replace").strip().splitlines()
            raise TrackingError(f"{what} exited ({process.returncode}): {lines[-1] if lines else 'no output'}")
        if up():
            return
        time.sleep(0.3)
    raise TrackingError(f"{what} did not answer at {url} within {START_TIMEOUT:.0f} s")
