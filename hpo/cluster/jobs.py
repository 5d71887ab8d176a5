"""A study's driver as a Ray job: submitted through the cluster's Jobs API (the Ray dashboard,
port 8265) so that it runs on the head after the laptop that submitted it is closed; listed,
followed and stopped by study name.

Ray's Jobs API is the engine; nothing here schedules. What this module adds is the mapping from
studies to jobs and the settings a study's driver needs:

- the job id is derived from the study (``hpo-<study>``, then ``hpo-<study>-2`` … for each
  resume), and Ray refuses a second job with an existing id, so a repeated submit cannot start a
  second driver;
- the job's metadata names the study, the user, the spec's hash and the hpo version;
- the entrypoint runs ``$HPO_BIN`` (the image's own ``hpo`` by absolute path: a job inherits
  the head's ``PATH``), and refuses to start where the head has no ``HPO_STORAGE``; the store's and
  MLflow's addresses, with their passwords, come from the head's environment, never from the
  job's ``env_vars`` (which any client of the Jobs API can read);
- ``RAY_JOB_STOP_WAIT_TIME_S`` gives a stopped driver :data:`STOP_GRACE_S` seconds to fail its
  running trials and close its MLflow runs (Ray's default, 3 s, kills that clean-up);
- each job asks for one unit of the head's :data:`DRIVER_RESOURCE` when the cluster declares it,
  so at most that many drivers run and the rest wait queued. Ray promises no order among waiting
  jobs, and no priorities.
"""

from __future__ import annotations

import fnmatch
import getpass
import hashlib
import json
import os
import re
import shlex
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpo import __version__
from hpo.errors import HpoError, describe
from hpo.user_code import CODE_EXCLUDES

#: The cluster's Jobs API address, ``http://HEAD:8265``, when ``--cluster`` is not given.
CLUSTER_ENV = "HPO_CLUSTER"
#: Ray's token (``RAY_AUTH_MODE=token`` on the cluster), or the file that holds it; else
#: ``~/.ray/auth_token``, as Ray's own clients look.
TOKEN_ENV, TOKEN_PATH_ENV = "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"
#: The custom resource of the head that queues drivers: ``--resources '{"hpo_driver": K}'``.
DRIVER_RESOURCE = "hpo_driver"
#: Seconds a stopped driver has to clean up before Ray kills it.
STOP_GRACE_S = 60
#: The most a code folder may weigh through Ray 2.60's Jobs API (its HTTP server's request cap).
UPLOAD_LIMIT_BYTES = 100 * 2**20
#: Prefix of the jobs this service submits, and the metadata keys it sets on them.
JOB_PREFIX = "hpo-"
STUDY_KEY, USER_KEY, SPEC_HASH_KEY, VERSION_KEY, KIND_KEY = (
    "hpo_study",
    "hpo_user",
    "hpo_spec_sha256",
    "hpo_version",
    "hpo_kind",
)
#: Ray's job states.
PENDING, RUNNING, STOPPED, SUCCEEDED, FAILED = "PENDING", "RUNNING", "STOPPED", "SUCCEEDED", "FAILED"
LIVE = (PENDING, RUNNING)
#: Ray's ``error_type`` of a job whose supervisor died with its node (a head restart).
SUPERVISOR_DIED = "JOB_SUPERVISOR_ACTOR_DIED"


class ClusterError(HpoError):
    """The cluster cannot be reached, refuses the request, or holds no such study."""


@dataclass(frozen=True)
class StudyJob:
    """One Ray job that drives (or drove) a study.

    Args:
        job_id: Ray's submission id.
        study: The study it drives.
        status: Ray's state: PENDING, RUNNING, STOPPED, SUCCEEDED or FAILED.
        submitted: When it was submitted (seconds since the epoch).
        ended: When it ended (``None`` while live).
        message: Ray's message (a failure's reason).
        error_type: Ray's kind of failure, if any.
        metadata: What the job was submitted with (user, spec hash, hpo version, kind).
    """

    job_id: str
    study: str
    status: str
    submitted: float
    ended: float | None = None
    message: str = ""
    error_type: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def user(self) -> str:
        return self.metadata.get(USER_KEY, "")

    @property
    def reason(self) -> str:
        """The last line of Ray's message (a failure's cause), or empty."""
        lines = self.message.strip().splitlines()
        return lines[-1] if lines else ""

    @property
    def live(self) -> bool:
        return self.status in LIVE


def job_id(study: str, attempt: int = 1) -> str:
    """The Ray submission id of a study's ``attempt``-th job: its name where Ray-safe, else the
    safe part and a short hash, so two studies never share one."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "-", study)[:80]
    if safe != study:
        safe += "-" + hashlib.sha256(study.encode()).hexdigest()[:8]
    return f"{JOB_PREFIX}{safe}" + (f"-{attempt}" if attempt > 1 else "")


def spec_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_token() -> str | None:
    """Ray's token for a cluster with token authentication, found where Ray's clients find it:
    ``$RAY_AUTH_TOKEN``, the file ``$RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``."""
    if token := os.environ.get(TOKEN_ENV, "").strip():
        return token
    path = Path(os.environ.get(TOKEN_PATH_ENV) or Path.home() / ".ray" / "auth_token")
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def driver_version_warning() -> str | None:
    """Inside a job submitted by ``hpo submit --cluster``: a warning when the cluster's hpo is not
    the version that submitted it (the job's metadata), since the spec was checked by that one."""
    try:
        metadata = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("metadata") or {}
    except ValueError:
        return None
    submitted = metadata.get(VERSION_KEY)
    if submitted and submitted != __version__:
        return f"this job was submitted by dropout-hpo {submitted} and runs on the cluster's {__version__}"
    return None


def client_version_warning(cluster: Cluster) -> str | None:
    """A warning when this machine's Ray differs from the cluster's (the job client and the Jobs
    API are made to match)."""
    import ray

    theirs = cluster.ray_version()
    if theirs and theirs != ray.__version__:
        return f"Ray {ray.__version__} here, {theirs} on the cluster at {cluster.address}: install Ray {theirs}"
    return None


def _excluded(relative: str, is_dir: bool, patterns: list[str]) -> bool:
    name = relative.rsplit("/", 1)[-1]
    for pattern in patterns:
        if pattern.endswith("/"):
            if is_dir and fnmatch.fnmatch(name, pattern[:-1]):
                return True
        elif fnmatch.fnmatch(name, pattern) or fnmatch.fnmatch(relative, pattern.lstrip("/")):
            return True
    return False


def _ignore_patterns(folder: Path) -> list[str]:
    """:data:`CODE_EXCLUDES` and the folder's own ``.gitignore`` and ``.rayignore`` lines (Ray
    honours both); negations are not followed, so the size found is at most a little high."""
    patterns = list(CODE_EXCLUDES)
    for name in (".gitignore", ".rayignore"):
        try:
            lines = (folder / name).read_text().splitlines()
        except OSError:
            continue
        patterns += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith(("#", "!"))]
    return patterns


def shipped_bytes(folder: str | Path) -> int:
    """Bytes of the files Ray would upload from ``folder`` as a job's working directory."""
    root = Path(folder)
    patterns = _ignore_patterns(root)
    total = 0
    for path, dirs, files in os.walk(root, followlinks=True):
        relative = os.path.relpath(path, root)
        prefix = "" if relative == "." else relative.replace(os.sep, "/") + "/"
        dirs[:] = [d for d in dirs if not _excluded(prefix + d, True, patterns)]
        for name in files:
            if not _excluded(prefix + name, False, patterns):
                try:
                    total += os.stat(os.path.join(path, name)).st_size
                except OSError:
                    continue
    return total


def check_upload(folder: str | Path, limit: int = UPLOAD_LIMIT_BYTES) -> None:
    """Refuse a code folder over Ray's upload limit before anything is sent."""
    size = shipped_bytes(folder)
    if size > limit:
        raise ClusterError(
            f"the code folder {folder} holds {size / 2**20:.0f} MiB to ship, over the {limit / 2**20:.0f} MiB "
            "Ray's Jobs API accepts; move data and checkpoints out of it, list them in a .rayignore, or "
            "point --code-dir at a folder holding only your code"
        )


def entrypoint(verb_args: list[str], *, tracking: bool) -> str:
    """The job's shell command: the head's ``hpo`` (``$HPO_BIN``) with ``verb_args``, after
    checking that the head's environment names the study store (and the MLflow server, when
    the study is tracked), so a driver never writes a store or runs that vanishes with the job."""
    checks = [
        'test -n "$HPO_STORAGE" || { echo "error: the Ray head has no HPO_STORAGE: set the study store\'s '
        'URL in its environment (docker/compose.yaml does)" >&2; exit 2; }'
    ]
    if tracking:
        checks.append(
            'test -n "$MLFLOW_TRACKING_URI" || { echo "error: the Ray head has no MLFLOW_TRACKING_URI: set the '
            'MLflow server in its environment, or submit with --no-tracking" >&2; exit 2; }'
        )
    return "; ".join([*checks, 'exec "${HPO_BIN:-hpo}" ' + shlex.join(verb_args)])


class Cluster:
    """A Ray cluster's Jobs API, with its token; errors are :class:`ClusterError` lines that name
    the address."""

    def __init__(self, address: str, token: str | None = None) -> None:
        if not address.startswith(("http://", "https://")):
            raise ClusterError(
                f"--cluster takes the Ray dashboard's address, http://HEAD:8265, not {address!r} "
                "(ray:// addresses are for --ray-address)"
            )
        self.address = address.rstrip("/")
        token = token if token is not None else read_token()
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            from ray.job_submission import JobSubmissionClient
        except ImportError as exc:  # pragma: no cover - ray[default] is a dependency
            raise ClusterError(f"Ray's job client needs ray[default] ({describe(exc)})") from None
        try:
            self.client = JobSubmissionClient(self.address, headers=dict(self.headers))
        except Exception as exc:
            raise self._error(exc) from None

    def _error(self, exc: BaseException) -> ClusterError:
        text = str(exc)
        if "401" in text or "Unauthorized" in text or "authentication" in text.lower():
            why = "it asks for Ray's token: set RAY_AUTH_TOKEN (docker/.env holds it) or RAY_AUTH_TOKEN_PATH"
        elif "ray[default]" in text:
            why = "the head serves no Jobs API: install ray[default] there"
        else:
            why = describe(exc)
        return ClusterError(f"cannot use the Ray cluster at {self.address} ({why}); `hpo doctor` checks it")

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return getattr(self.client, method)(*args, **kwargs)
        except Exception as exc:
            raise self._error(exc) from None

    def ray_version(self) -> str | None:
        return getattr(self.client, "_server_ray_version", None)

    def declares_driver_slots(self) -> bool:
        """Whether some node of the cluster declares :data:`DRIVER_RESOURCE` (the queue). A head
        that has just started lists no node for a few seconds; that is waited out."""
        import requests

        deadline = time.monotonic() + 30
        while True:
            try:  # Ray's state API (what `ray list nodes --detail` reads)
                reply = requests.get(f"{self.address}/api/v0/nodes?detail=1", headers=self.headers, timeout=30)
                reply.raise_for_status()
                nodes = [n for n in reply.json()["data"]["result"]["result"] if n.get("state") == "ALIVE"]
            except Exception as exc:
                raise self._error(exc) from None
            if nodes or time.monotonic() > deadline:
                return any(DRIVER_RESOURCE in (node.get("resources_total") or {}) for node in nodes)
            time.sleep(1)

    def jobs(self) -> list[StudyJob]:
        """Every job this service submitted, oldest first."""
        found = []
        for job in self._call("list_jobs"):
            metadata = dict(job.metadata or {})
            if STUDY_KEY not in metadata or not job.submission_id:
                continue
            found.append(
                StudyJob(
                    job_id=job.submission_id,
                    study=metadata[STUDY_KEY],
                    status=str(getattr(job.status, "value", job.status)),
                    submitted=(job.start_time or 0) / 1000,
                    ended=None if not job.end_time else job.end_time / 1000,
                    message=job.message or "",
                    error_type=job.error_type,
                    metadata=metadata,
                )
            )
        return sorted(found, key=lambda j: j.submitted)

    def study_jobs(self, study: str) -> list[StudyJob]:
        return [job for job in self.jobs() if job.study == study]

    def latest(self, study: str) -> StudyJob:
        jobs = self.study_jobs(study)
        if not jobs:
            raise ClusterError(
                f"the Ray cluster at {self.address} has no job for study {study!r} (`hpo status` lists them)"
            )
        return jobs[-1]

    def submit(
        self,
        study: str,
        verb_args: list[str],
        *,
        kind: str,
        spec_text: str | None,
        working_dir: str | None,
        tracking: bool,
    ) -> StudyJob:
        """Submit the driver of ``study`` (``hpo <verb_args>`` on the head) and return its job.
        Refused while another job drives the study; ``working_dir`` is uploaded with the job."""
        jobs = self.study_jobs(study)
        if live := [job for job in jobs if job.live]:
            raise ClusterError(
                f"study {study!r} is already {'queued' if live[-1].status == PENDING else 'running'} on "
                f"{self.address} as job {live[-1].job_id}; "
                f"`hpo stop {study}` stops it"
            )
        if kind == "submit" and (earlier := [job for job in jobs if job.metadata.get(KIND_KEY) == "submit"]):
            raise ClusterError(
                f"study {study!r} was submitted to {self.address} before, as job {earlier[0].job_id} "
                f"({earlier[-1].status.lower()}); `hpo resume {study} --cluster {self.address}` continues it"
            )
        if working_dir is not None:
            check_upload(working_dir)
        queue = self.declares_driver_slots()
        metadata = {STUDY_KEY: study, USER_KEY: getpass.getuser(), VERSION_KEY: __version__, KIND_KEY: kind}
        if spec_text is not None:
            metadata[SPEC_HASH_KEY] = spec_hash(spec_text)
        runtime_env: dict[str, Any] = {"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": str(STOP_GRACE_S)}}
        if working_dir is not None:
            runtime_env.update(working_dir=working_dir, excludes=CODE_EXCLUDES)
        submission_id = job_id(study, len(jobs) + 1)
        self._call(
            "submit_job",
            entrypoint=entrypoint(verb_args, tracking=tracking),
            submission_id=submission_id,
            runtime_env=runtime_env,
            metadata=metadata,
            entrypoint_resources={DRIVER_RESOURCE: 1} if queue else None,
        )
        return StudyJob(submission_id, study, PENDING, time.time(), metadata=metadata)

    def logs(self, study: str) -> str:
        return self._call("get_job_logs", self.latest(study).job_id)

    def follow(self, study: str, every: float = 1.0) -> Iterator[str]:
        """The driver's log as it grows, until its job ends. Read whole each time rather than
        through Ray's tail, which can miss a log's last lines."""
        job_id_ = self.latest(study).job_id
        shown = 0
        while True:
            status = str(getattr(self._call("get_job_status", job_id_), "value", ""))
            text = self._call("get_job_logs", job_id_)
            if len(text) > shown:
                yield text[shown:]
                shown = len(text)
            if status not in LIVE:
                return
            time.sleep(every)

    def stop(self, study: str) -> StudyJob:
        """Ask Ray to stop the study's live job (SIGTERM to the driver, which abandons its running
        trials cleanly); returns that job."""
        live = [job for job in self.study_jobs(study) if job.live]
        if not live:
            raise ClusterError(f"study {study!r} has no queued or running job on {self.address}")
        self._call("stop_job", live[-1].job_id)
        return live[-1]
