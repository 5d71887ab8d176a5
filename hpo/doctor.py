"""``hpo doctor``: can this machine reach the services a study needs? One check per service,
each answering within seconds and saying what is wrong in one line.

- the study store (``--storage`` / ``HPO_STORAGE``): open it and list its studies;
- the MLflow tracking URI (``--tracking-uri`` / ``MLFLOW_TRACKING_URI``): a server's ``/health``,
  or an SQL store's experiments;
- the Ray cluster (``--ray-address`` / ``RAY_ADDRESS``): a TCP connection to its GCS or client
  port (no address: a local instance will be started, nothing to reach).
"""

from __future__ import annotations

import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from hpo.errors import describe
from hpo.running.store import redact, sqlite_path, storage_url

#: Seconds each network check may take.
TIMEOUT = 5.0


@dataclass(frozen=True)
class Check:
    service: str
    target: str
    ok: bool
    detail: str
    seconds: float


def _timed(service: str, target: str, probe: Callable[[], str]) -> Check:
    start = time.perf_counter()
    try:
        detail, ok = probe(), True
    except Exception as exc:
        detail, ok = describe(exc), False
    return Check(service, target, ok, detail, time.perf_counter() - start)


def check_store(url: str | None) -> Check:
    url = storage_url(url)

    def probe() -> str:
        import optuna
        from optuna.storages import RDBStorage

        if (db := sqlite_path(url)) is not None and not db.exists():
            return "no file yet: the first `hpo submit` creates it"
        kwargs = {} if url.startswith("sqlite") else {"connect_args": {"connect_timeout": int(TIMEOUT)}}
        storage = RDBStorage(url, engine_kwargs=kwargs)
        return f"{len(optuna.get_all_study_summaries(storage, include_best_trial=False))} studies"

    return _timed("study store", redact(url), probe)


def check_tracking(uri: str | None) -> Check:
    from hpo.tracking import tracking_uri

    uri = tracking_uri(uri)

    def probe() -> str:
        if uri.startswith(("http://", "https://")):
            import urllib.request

            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=TIMEOUT) as response:
                return f"server answers ({response.status})"
        if (db := sqlite_path(uri)) is not None and not db.exists():
            return "no file yet: the first tracked study creates it"
        from mlflow import MlflowClient

        return f"{len(MlflowClient(uri).search_experiments())} experiments"

    return _timed("MLflow tracking", redact(uri), probe)


def check_ray(address: str | None) -> Check:
    if not address or address == "local":
        return Check("Ray", "local", True, "no address: a local Ray instance starts when a study needs it", 0.0)
    if address == "auto":
        return _timed("Ray", address, _ray_auto)

    def probe() -> str:
        parts = urlsplit(address if "://" in address else f"ray://{address}")
        port = parts.port or (10001 if address.startswith("ray://") else 6379)
        with socket.create_connection((parts.hostname, port), timeout=TIMEOUT):
            return f"port {port} on {parts.hostname} accepts connections"

    return _timed("Ray", address, probe)


def _ray_auto() -> str:
    """``auto`` joins a cluster started on this machine with ``ray start``, which records its
    address in ``/tmp/ray/ray_current_cluster``."""
    record = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    if not record.exists():
        raise ConnectionError("RAY_ADDRESS=auto but no `ray start` cluster runs on this machine")
    address = record.read_text().strip()
    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=TIMEOUT):
        return f"cluster at {address} accepts connections"


def check_cluster(address: str) -> Check:
    """The Jobs API at ``address`` (``hpo submit --cluster``): reachable, Ray's token accepted,
    and whether the head queues drivers."""

    def probe() -> str:
        from hpo.cluster.jobs import DRIVER_RESOURCE, Cluster

        cluster = Cluster(address)
        queue = (
            f"queues drivers ({DRIVER_RESOURCE})"
            if cluster.declares_driver_slots()
            else f"no {DRIVER_RESOURCE} resource: drivers start at once, unqueued"
        )
        return f"Ray {cluster.ray_version() or '?'} serves the Jobs API; {queue}"

    return _timed("Ray Jobs API", address, probe)


def diagnose(
    storage: str | None, tracking: str | None, ray_address: str | None, cluster: str | None = None
) -> list[Check]:
    checks = [check_store(storage), check_tracking(tracking), check_ray(ray_address)]
    return checks + ([check_cluster(cluster)] if cluster else [])
