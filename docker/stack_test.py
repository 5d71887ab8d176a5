"""Build the cluster stack of docker/ with no registry, run studies through it and inject faults.

Builds the images of compose.yaml offline with podman (a Debian base from mmdebstrap, a CPU
torch stand-in for the PyTorch base, Debian's PostgreSQL for postgres:16, then docker/Dockerfile
itself), starts the compose file with Debian's docker-compose 1.29 against podman's Docker API
with two Ray worker containers, and checks from outside what a user would:

- ``hpo doctor`` reaches PostgreSQL, MLflow and Ray through the published ports;
- a study submitted through the ``hpo`` CLI service finishes its exact budget on PostgreSQL,
  with trials on both worker containers and its runs (parent, children, epoch metrics) in MLflow;
- the same from this host through ``ray://`` (Ray client);
- a study submitted from this host to the head's Jobs API (``hpo submit --cluster``), run there
  as a Ray job to its exact budget, and shown finished by ``hpo status --cluster``;
- the MLflow dashboard renders the study in headless Chromium, and with ``MLFLOW_AUTH=1``
  refuses a request without credentials;
- faults while a study runs: a worker killed, MLflow stopped, PostgreSQL restarted, the driver
  container killed; each ends (after ``hpo resume`` / ``hpo sync`` where needed) with the exact
  budget, no finished trial lost and none left RUNNING;
- ``down`` then ``up`` keeps studies, runs and artifacts.

Run from the repository root as root on a Debian machine with podman (see
../docs/cluster.md and docker/README.md, "The stack test"); prints a table of phase times and
exits non-zero on the first failed check. Everything it starts is removed at the end (images
too, unless ``--keep-images``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
PROJECT = "hpostack"
#: Published ports bind here: CI machines run their own PostgreSQL on 127.0.0.1:5432.
BIND = "127.0.0.2"
DEBIAN = "localhost/hpo-debian:bookworm"
PYTHON = "localhost/hpo-python:bookworm"
POSTGRES = "localhost/hpo-postgres:15"
IMAGE = "localhost/dropout-hpo:stack-test"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
#: Name resolution between containers: CNI's dnsname plugin (podman 4.3's default CNI backend) or
#: netavark's aardvark-dns.
DNS_PLUGINS = ("/usr/lib/cni/dnsname", "/usr/lib/podman/aardvark-dns")
TORCH_WHEELS = Path(os.environ.get("HPO_STACK_TORCH_WHEELS", "/opt/wheels"))
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""
#: Packages pinned in the image to this host's versions: Ray's client needs the same Ray (and
#: Python minor) on both sides; the rest keeps host and cluster reading the same stores alike.
PINNED = (
    "ray",
    "grpcio",
    "optuna",
    "optuna-integration",
    "mlflow",
    "mlflow-skinny",
    "sqlalchemy",
    "lightning",
    "numpy",
    "scikit-learn",
    "pydantic",
)
SPEC = """\
name: {name}
description: The stack test's study (digits MLP, {epochs} epochs a trial).
data: {{dataset: digits, val_fraction: 0.2, test_fraction: 0.2, seed: 0}}
model: {{arch: mlp, layers: 1, units: 32, activation: relu}}
dropout: {{hidden: {{low: 0.0, high: 0.6}}, max_norm: {{choice: [null, 3.0]}}}}
training: {{optimizer: sgd, lr: {{low: 0.01, high: 0.3, log: true}}, momentum: 0.9, batch_size: 64, epochs: {epochs}}}
objective: [{{metric: val/acc, direction: maximize}}]
sampler: {{name: tpe, seed: 0}}
budget: {{trials: {trials}}}
"""


class StackError(RuntimeError):
    """A check of the stack failed; the message says which and what was seen."""


@dataclass
class Stack:
    """The podman store, socket and compose project of one run (all under ``work``)."""

    work: Path
    password: str = field(default_factory=lambda: secrets.token_hex(12))
    timings: list[tuple[str, float]] = field(default_factory=list)
    service: subprocess.Popen | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "CONTAINERS_CONF": str(self.work / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(self.work / "storage.conf"),
            "DOCKER_HOST": f"unix://{self.work / 'podman.sock'}",
        }

    @property
    def storage(self) -> str:
        return f"postgresql://hpo:{self.password}@{BIND}:5432/hpo"

    @property
    def tracking(self) -> str:
        return f"http://{BIND}:5000"

    def run(self, *cmd: str | Path, check: bool = True, timeout: float = 900, **kw) -> subprocess.CompletedProcess:
        out = subprocess.run(
            [str(c) for c in cmd],
            env=kw.pop("env", self.env),
            text=True,
            capture_output=True,
            timeout=timeout,
            check=False,
            **kw,
        )
        if check and out.returncode != 0:
            raise StackError(f"{' '.join(map(str, cmd[:4]))} … exited {out.returncode}: {tail(out)}")
        return out

    def podman(self, *args: str | Path, **kw) -> subprocess.CompletedProcess:
        return self.run("podman", *args, **kw)

    def compose_argv(self, *args: str) -> list[str]:
        return [
            "docker-compose",
            "--project-name",
            PROJECT,
            "--project-directory",
            str(DOCKER),
            "--env-file",
            str(self.work / "stack.env"),
            "-f",
            str(DOCKER / "compose.yaml"),
            *args,
        ]

    def compose(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.run(*self.compose_argv(*args), **kw)

    def compose_popen(self, *args: str, log: Path) -> subprocess.Popen:
        """``docker-compose ARGS`` in the background, its output in ``log``."""
        with open(log, "w") as out:
            return subprocess.Popen(
                self.compose_argv(*args), env=self.env, text=True, stdout=out, stderr=subprocess.STDOUT
            )

    def containers(self, *filters: str, fields: str = "{{.Names}}") -> list[str]:
        """``fields`` of the compose project's containers (and ``filters``), a line each."""
        return self.podman(
            "ps", "--filter", f"label=com.docker.compose.project={PROJECT}", *filters, "--format", fields, check=False
        ).stdout.splitlines()

    def hpo(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
        """The hpo CLI of this host, pointed at the stack's published ports."""
        env = {**os.environ, "HPO_STORAGE": self.storage, "MLFLOW_TRACKING_URI": self.tracking}
        return self.run(sys.executable, "-m", "hpo", *args, env=env, check=check, timeout=timeout)

    def in_cluster(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
        """``hpo ARGS`` in a fresh container of the compose file's ``hpo`` service."""
        return self.compose(
            "run",
            "--rm",
            "-T",
            "-v",
            f"{self.work / 'specs'}:/specs:ro",
            "hpo",
            "hpo",
            *args,
            check=check,
            timeout=timeout,
        )

    def container(self, service: str, index: int = 1) -> str:
        return f"{PROJECT}_{service}_{index}"

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        print(f"== {name}", flush=True)
        start = time.monotonic()
        yield
        self.timings.append((name, time.monotonic() - start))
        print(f"   {name}: {self.timings[-1][1]:.0f} s", flush=True)


def tail(out: subprocess.CompletedProcess, lines: int = 15) -> str:
    text = (out.stdout or "") + (out.stderr or "")
    return "\n".join(text.strip().splitlines()[-lines:])


def wait_for(what: str, check, timeout: float, every: float = 2.0):
    """Poll ``check()`` until it returns something truthy; StackError naming ``what`` after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):
            if result := check():
                return result
        if time.monotonic() > deadline:
            raise StackError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


# -- podman ---------------------------------------------------------------------------------


def start_podman(stack: Stack) -> None:
    """podman with the settings these VMs need (:data:`CONTAINERS_CONF`: runc, cgroupfs, file
    events, raised open-file limits; no systemd, no Docker daemon), its store under ``work``,
    and its Docker-compatible API on a socket for docker-compose; health checks run by a loop
    (no systemd here to run them)."""
    stack.work.mkdir(parents=True, exist_ok=True)
    (stack.work / "containers.conf").write_text(CONTAINERS_CONF)
    (stack.work / "storage.conf").write_text(
        f'[storage]\ndriver = "overlay"\ngraphroot = "{stack.work / "storage"}"\nrunroot = "{stack.work / "run"}"\n'
    )
    sock, pid = stack.work / "podman.sock", stack.work / "podman-service.pid"
    if pid.exists():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid.read_text()), signal.SIGTERM)
    sock.unlink(missing_ok=True)
    with open(stack.work / "podman-service.log", "w") as log:
        stack.service = subprocess.Popen(
            ["podman", "system", "service", "--time=0", f"unix://{sock}"],
            env=stack.env,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    pid.write_text(str(stack.service.pid))
    wait_for("podman's API socket", sock.exists, 30, every=0.2)
    threading.Thread(target=_health_checks, args=(stack,), daemon=True).start()


def _health_checks(stack: Stack) -> None:
    while not stack._stop.wait(3.0):
        for name in stack.containers():
            stack.podman("healthcheck", "run", name, check=False, timeout=60)


def build_images(stack: Stack, host_python: str) -> None:
    """The four images, each skipped when already in the store (``--keep-images`` runs)."""

    def have(image: str) -> bool:
        return stack.podman("image", "exists", image, check=False).returncode == 0

    mounts = ["-v", f"{CA_BUNDLE}:{CA_BUNDLE}:ro"] if CA_BUNDLE.exists() else []
    if not have(DEBIAN):
        tar = stack.work / "debian.tar"
        stack.run(
            "mmdebstrap",
            "--quiet",
            "--format=tar",
            "--variant=minbase",
            "--include=python3,python3-venv,python3-pip,ca-certificates",
            "bookworm",
            tar,
        )
        stack.podman("import", "--change", 'CMD ["/bin/bash"]', tar, DEBIAN)
        tar.unlink()
    if not have(PYTHON):
        wheels = sorted(TORCH_WHEELS.glob("torch-2.*+cpu-cp311-*.whl")) if TORCH_WHEELS.is_dir() else []
        torch = (
            ["--build-arg", f"TORCH=/wheels/{wheels[-1].name}", "-v", f"{TORCH_WHEELS}:/wheels:ro"] if wheels else []
        )
        stack.podman(
            "build",
            "-q",
            *mounts,
            *torch,
            "--build-arg",
            f"DEBIAN={DEBIAN}",
            "-f",
            DOCKER / "offline/python.Containerfile",
            "-t",
            PYTHON,
            DOCKER / "offline",
        )
    if not have(POSTGRES):
        stack.podman(
            "build",
            "-q",
            "--build-arg",
            f"DEBIAN={DEBIAN}",
            "-f",
            DOCKER / "offline/postgres.Containerfile",
            "-t",
            POSTGRES,
            DOCKER / "offline",
        )
    constraints = stack.work / "constraints.txt"
    freeze = stack.run(host_python, "-m", "pip", "freeze", env=os.environ).stdout.splitlines()
    constraints.write_text(
        "".join(f"{line}\n" for line in freeze if line.split("==")[0].lower().split("[")[0] in PINNED)
    )
    stack.podman(
        "build",
        "-q",
        *mounts,
        "-v",
        f"{constraints}:/constraints.txt:ro",
        "--build-arg",
        f"BASE={PYTHON}",
        "--build-arg",
        "EXTRAS=cluster",
        "--build-arg",
        "CONSTRAINTS=/constraints.txt",
        "-f",
        DOCKER / "Dockerfile",
        "-t",
        IMAGE,
        ROOT,
        timeout=1800,
    )


def write_env(stack: Stack, **extra: str) -> None:
    values = {
        "POSTGRES_USER": "hpo",
        "POSTGRES_PASSWORD": stack.password,
        "POSTGRES_BIND": BIND,
        "MLFLOW_BIND": BIND,
        "RAY_BIND": BIND,
        "HPO_IMAGE": IMAGE,
        "POSTGRES_IMAGE": POSTGRES,
        # docker-compose 1.29 rejects a numeric count given through a variable; podman
        # ignores NVIDIA reservations anyway (no GPU here).
        "GPUS_PER_WORKER": "all",
        "DATA_DIR": str(stack.work / "data"),
        "MLFLOW_ALLOWED_HOSTS": f"{BIND},{BIND}:5000",
        "MLFLOW_ALLOWED_ORIGINS": f"http://{BIND}:5000",
        **extra,
    }
    (stack.work / "data").mkdir(exist_ok=True)
    (stack.work / "stack.env").write_text("".join(f"{k}={v}\n" for k, v in values.items()))


def up(stack: Stack) -> None:
    stack.compose("up", "-d", "--no-build", "--scale", "ray-worker=2", timeout=900)
    wait_healthy(stack)


def wait_healthy(stack: Stack, timeout: float = 240) -> None:
    """Until the five services report healthy and both Ray workers joined the head."""

    def all_healthy() -> bool:
        services = [row for row in stack.containers(fields="{{.Names}} {{.Status}}") if "_hpo_run_" not in row]
        return len(services) == 5 and all("(healthy)" in row for row in services)

    wait_for("every service healthy", all_healthy, timeout)
    wait_for("two Ray workers joined to the head", lambda: _ray_nodes(stack) >= 3, timeout)


def _ray_nodes(stack: Stack) -> int:
    out = stack.podman(
        "exec", stack.container("ray-head"), "ray", "status", "--address=localhost:6379", check=False, timeout=60
    ).stdout
    return len(re.findall(r"^\s*1 node_", out, flags=re.MULTILINE))  # the head and each worker


def write_spec(stack: Stack, name: str, trials: int, epochs: int) -> Path:
    folder = stack.work / "specs"
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.yaml").write_text(SPEC.format(name=name, trials=trials, epochs=epochs))
    return folder / f"{name}.yaml"


# -- what the checks read ----------------------------------------------------------------------


def study_trials(stack: Stack, name: str) -> list:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=name, storage=stack.storage).get_trials(deepcopy=False)


def assert_budget(stack: Stack, name: str, budget: int, seen: str = "") -> list:
    """The study holds exactly ``budget`` finished trials as the service counts them (complete,
    pruned, or failed but not abandoned) and none RUNNING (``seen``: what the driver printed)."""
    from hpo.running.study import count_trials

    trials = study_trials(stack, name)
    counts = count_trials(trials)
    if counts.finished != budget or counts.running:
        raise StackError(
            f"study {name}: {counts}, expected exactly {budget} finished and none running"
            + (f" ({seen})" if seen else "")
        )
    return trials


def mlflow_runs(stack: Stack, name: str) -> tuple[list, list]:
    """The study's parent run and its trial runs in the MLflow server."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(stack.tracking)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        raise StackError(f"MLflow has no experiment {name}")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return [r for r in runs if "mlflow.parentRunId" not in r.data.tags], children


def assert_tracked(stack: Stack, name: str, finished: int) -> None:
    """MLflow holds the study's parent run and, for each of its ``finished`` trials, an ended trial
    run (FINISHED, or KILLED for a pruned trial) with per-epoch metrics."""
    from mlflow.tracking import MlflowClient

    parents, children = mlflow_runs(stack, name)
    ended = {c.info.run_name: c for c in children if c.info.status in ("FINISHED", "KILLED")}
    expected = {f"trial-{t.number:03d}" for t in study_trials(stack, name) if t.state.name in ("COMPLETE", "PRUNED")}
    if len(parents) != 1 or not expected or not expected <= set(ended):
        raise StackError(
            f"MLflow holds {len(parents)} parent run(s) of {name} and lacks the ended trial runs "
            f"{sorted(expected - set(ended))} (of {finished} finished trials)"
        )
    run = ended[min(expected)]
    history = MlflowClient(stack.tracking).get_metric_history(run.info.run_id, "val/acc")
    if len(history) < 2:
        raise StackError(f"trial run {run.info.run_name} of {name} has {len(history)} epochs of val/acc")


def hosts(trials: list) -> set[str]:
    return {t.user_attrs.get("worker", {}).get("host") for t in trials} - {None}


# -- the checks ----------------------------------------------------------------------------


def check_doctor(stack: Stack) -> None:
    out = stack.hpo(
        "doctor", "--storage", stack.storage, "--tracking-uri", stack.tracking, "--ray-address", f"ray://{BIND}:10001"
    )
    print(tail(out, 8))


def worker_cpus(stack: Stack) -> str:
    """CPUs of one worker container as Ray counts them (the head has none): a trial that
    reserves them all cannot share its worker, so two trials at once run on both."""
    out = stack.podman("exec", stack.container("ray-head"), "ray", "status", "--address=localhost:6379").stdout
    total = float(re.search(r"/([\d.]+) CPU", out).group(1))
    return f"{total / 2:g}"


def check_cli_study(stack: Stack) -> None:
    write_spec(stack, "stack-cli", trials=8, epochs=4)
    stack.in_cluster("submit", "/specs/stack-cli.yaml", "--workers", "2", "--cpus-per-trial", worker_cpus(stack))
    trials = assert_budget(stack, "stack-cli", 8)
    workers = hosts(trials)
    if len(workers) < 2:
        raise StackError(f"the trials ran on {sorted(workers)}, not on both worker containers")
    assert_tracked(stack, "stack-cli", 8)
    print(f"   8 trials on {len(workers)} worker containers; runs in MLflow")


def check_ray_client(stack: Stack) -> None:
    spec = write_spec(stack, "stack-client", trials=6, epochs=3)
    stack.hpo("submit", spec, "--workers", "2", "--ray-address", f"ray://{BIND}:10001")
    assert_budget(stack, "stack-client", 6)
    assert_tracked(stack, "stack-client", 6)


def check_jobs_api(stack: Stack) -> None:
    """A study submitted from this host through the head's Jobs API (port 8265) runs on the head
    as a Ray job: this CLI returns at once, the job (one of the head's hpo_driver slots, the image's
    HPO_BIN, the head's store and MLflow server) ends the exact budget, and `hpo status` joins the
    job with the store."""
    from hpo.cluster.jobs import Cluster

    spec = write_spec(stack, "stack-job", trials=6, epochs=3)
    cluster = f"http://{BIND}:8265"
    out = stack.hpo("submit", spec, "--workers", "2", "--cluster", cluster, timeout=300)
    if "as job hpo-stack-job" not in out.stdout:
        raise StackError(f"hpo submit --cluster did not name its job: {tail(out)}")
    jobs = Cluster(cluster)

    def ended():
        job = jobs.latest("stack-job")
        return None if job.live else job

    job = wait_for("the study's Ray job to end", ended, 900)
    if job.status != "SUCCEEDED":
        raise StackError(f"job {job.job_id} ended {job.status}: {jobs.logs('stack-job')[-3000:]}")
    assert_budget(stack, "stack-job", 6)
    assert_tracked(stack, "stack-job", 6)
    status = stack.hpo("status", "--cluster", cluster).stdout
    row = next((line for line in status.splitlines() if "stack-job" in line), "")
    if "finished" not in row or "6/6" not in row:
        raise StackError(f"hpo status --cluster shows {row!r} for the finished study")
    print(f"   6 trials through job {job.job_id}; hpo status: finished")


def check_dashboard(stack: Stack) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise StackError("no chromium on PATH (apt-get install chromium)")
    from hpo.tracking.dashboard import study_address

    address = study_address(stack.tracking, stack.tracking, "stack-cli").table
    html = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--virtual-time-budget=20000",
            "--dump-dom",
            address,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    ).stdout
    page = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", re.sub(r"<style.*?</style>", " ", html, flags=re.DOTALL)))
    shown = set(re.findall(r"trial-\d{3}", page))
    if "stack-cli" not in page or len(shown) != 8:
        raise StackError(f"the MLflow dashboard at {address} rendered {len(shown)} of the 8 trial runs of stack-cli")
    write_env(
        stack, MLFLOW_AUTH="1", MLFLOW_ADMIN_PASSWORD=secrets.token_hex(8), MLFLOW_SECRET_KEY=secrets.token_hex(16)
    )
    stack.compose("up", "-d", "--no-build", "--no-deps", "mlflow")
    try:

        def refused() -> bool:
            try:
                urllib.request.urlopen(f"{stack.tracking}/api/2.0/mlflow/experiments/search?max_results=1", timeout=5)
            except urllib.error.HTTPError as exc:
                return exc.code == 401
            return False

        wait_for("MLflow with MLFLOW_AUTH=1 to refuse a request without credentials (401)", refused, 120)
    finally:
        write_env(stack)
        stack.compose("up", "-d", "--no-build", "--no-deps", "mlflow")
        wait_for("MLflow back without auth", lambda: urllib.request.urlopen(f"{stack.tracking}/health", timeout=5), 120)


#: Trials of each fault's study: the fault lands once 2 have finished, so 6 are left to run
#: through it and after (16 and 12 before; the worker fault took 4.5 min of a 20-min stack test).
FAULT_TRIALS = 8


@contextlib.contextmanager
def study_running(stack: Stack, name: str, trials: int, epochs: int, after: int) -> Iterator[subprocess.Popen]:
    """A study submitted through the hpo service in the background; yields once ``after``
    trials finished, then waits for the driver to exit."""
    write_spec(stack, name, trials=trials, epochs=epochs)
    container = f"{PROJECT}_driver_{name}"
    driver = stack.compose_popen(
        "run",
        "--name",
        container,
        "-T",
        "-v",
        f"{stack.work / 'specs'}:/specs:ro",
        "hpo",
        "hpo",
        "submit",
        f"/specs/{name}.yaml",
        "--workers",
        "2",
        "--cpus-per-trial",
        worker_cpus(stack),
        log=stack.work / f"{name}.log",
    )
    driver.log = stack.work / f"{name}.log"
    try:
        wait_for(
            f"{after} finished trials of {name}",
            lambda: sum(t.state.is_finished() for t in study_trials(stack, name)) >= after,
            300,
            every=1.0,
        )
        yield driver
        driver.wait(timeout=600)
    finally:
        if driver.poll() is None:
            driver.kill()
        driver.exit_code = container_exit(stack, container, driver.returncode)


def container_exit(stack: Stack, container: str, fallback: int | None) -> int | None:
    """The exit code of a finished ``docker-compose run`` container, read from podman, and the
    container removed. docker-compose 1.29 on podman's API can lose its wait for the container
    while another container of the project stops (podman: 'While waiting on condition: unexpected
    end of JSON input') and exit 125 although the driver finished its budget; podman keeps what
    the driver itself returned."""
    out = stack.podman("inspect", "--format", "{{.State.ExitCode}}", container, check=False)
    stack.podman("rm", "-f", container, check=False)
    code = out.stdout.strip()
    return int(code) if out.returncode == 0 and code.lstrip("-").isdigit() else fallback


def driver_exit(driver: subprocess.Popen) -> str:
    """The driver's exit status and the line of its output that says how it ended."""
    lines = [
        line.strip() for line in driver.log.read_text().splitlines() if line.strip() and not line.strip().isdigit()
    ]
    telling = [line for line in lines if line.startswith(("error", "budget reached", "stopped"))] or lines[-1:]
    return f"driver exited {driver.exit_code}" + (f": {telling[-1][:200]}" if telling else "")


def resume_if_needed(stack: Stack, name: str, driver: subprocess.Popen) -> str:
    seen = driver_exit(driver)
    if driver.exit_code != 0:
        stack.in_cluster("resume", name, "--take-over")
        seen += "; hpo resume completed the budget"
    return seen


def fault_worker_killed(stack: Stack) -> str:
    """Worker 1 killed while it trains a trial, then started again."""
    worker = stack.container("ray-worker", 1)
    host = stack.podman("inspect", "--format", "{{.Config.Hostname}}", worker).stdout.strip()
    with study_running(stack, "fault-worker", trials=FAULT_TRIALS, epochs=60, after=2) as driver:
        wait_for(
            f"a trial training on {worker}",
            lambda: [
                t
                for t in study_trials(stack, "fault-worker")
                if t.state.name == "RUNNING" and t.user_attrs.get("worker", {}).get("host") == host
            ],
            120,
            every=0.5,
        )
        stack.podman("kill", worker)
        time.sleep(3)
        stack.podman("start", stack.container("ray-worker", 1), check=False)
    seen = resume_if_needed(stack, "fault-worker", driver)
    trials = assert_budget(stack, "fault-worker", FAULT_TRIALS, seen)
    failed = sum(t.state.name == "FAIL" for t in trials)
    if not failed:
        raise StackError(f"killing {worker} mid-trial failed no trial ({seen})")
    wait_healthy(stack)
    return f"{seen}; {failed} trial(s) failed as 'worker lost' (counted, their configurations run again)"


def outage(stack: Stack, study: str, service: str, seconds: float) -> tuple[subprocess.Popen, str]:
    """A study of :data:`FAULT_TRIALS` trials during which ``service`` is stopped for
    ``seconds``; the driver and what it printed at its end, once its budget is checked."""
    with study_running(stack, study, trials=FAULT_TRIALS, epochs=10, after=2) as driver:
        stack.podman("stop", "-t", "5", stack.container(service))
        time.sleep(seconds)
        stack.podman("start", stack.container(service))
    seen = driver_exit(driver)
    if driver.exit_code != 0:
        raise StackError(f"a {seconds:g} s {service} outage stopped the driver ({seen})")
    assert_budget(stack, study, FAULT_TRIALS, seen)
    return driver, seen


def fault_mlflow_stopped(stack: Stack) -> str:
    _, seen = outage(stack, "fault-mlflow", "mlflow", 8)
    wait_for("MLflow back", lambda: urllib.request.urlopen(f"{stack.tracking}/health", timeout=5), 120)
    stack.in_cluster("sync", "fault-mlflow")
    assert_tracked(stack, "fault-mlflow", FAULT_TRIALS)
    wait_healthy(stack)
    return f"{seen}; hpo sync made MLflow whole"


def fault_postgres_restarted(stack: Stack) -> str:
    """PostgreSQL down for 10 s mid-study: the driver waits it out (up to 120 s)."""
    driver, seen = outage(stack, "fault-postgres", "postgres", 10)
    waited = [line for line in driver.log.read_text().splitlines() if "stopped answering" in line]
    wait_healthy(stack)
    stack.in_cluster("sync", "fault-postgres")  # MLflow's server stores on the same PostgreSQL
    assert_tracked(stack, "fault-postgres", FAULT_TRIALS)
    return (
        f"{seen}; "
        + ("the driver waited for the store" if waited else "the driver never noticed")
        + "; hpo sync made MLflow whole"
    )


def fault_driver_killed(stack: Stack) -> str:
    with study_running(stack, "fault-driver", trials=FAULT_TRIALS, epochs=10, after=2) as driver:
        drivers = stack.containers("--filter", "label=com.docker.compose.service=hpo")
        if not drivers:
            raise StackError("no container of the hpo service to kill")
        for name in drivers:
            stack.podman("kill", name)
    seen = resume_if_needed(stack, "fault-driver", driver)
    assert_budget(stack, "fault-driver", FAULT_TRIALS, seen)
    return seen


def check_volumes(stack: Stack) -> None:
    from mlflow.artifacts import download_artifacts
    from mlflow.tracking import MlflowClient

    before = {name: len(study_trials(stack, name)) for name in ("stack-cli", "stack-client")}
    _, children = mlflow_runs(stack, "stack-cli")
    client = MlflowClient(stack.tracking)
    experiment = client.get_experiment_by_name("stack-cli").experiment_id
    models = client.search_logged_models([experiment])
    if not models:
        raise StackError("MLflow holds no logged model of stack-cli (the best trial's network)")
    stack.compose("down", timeout=300)
    up(stack)
    after = wait_for(
        "the study store after down/up", lambda: {name: len(study_trials(stack, name)) for name in before}, 120
    )
    if after != before:
        raise StackError(f"trials before down/up {before}, after {after}")
    _, again = mlflow_runs(stack, "stack-cli")
    if len(again) != len(children):
        raise StackError(f"MLflow held {len(children)} trial runs before down/up, {len(again)} after")
    files = download_artifacts(
        artifact_uri=models[0].artifact_location, dst_path=str(stack.work / "model"), tracking_uri=stack.tracking
    )
    if not (Path(files) / "data" / "model.pth").is_file():
        raise StackError(
            f"the logged model {models[0].model_id} lost its files in down/up: {sorted(Path(files).rglob('*'))}"
        )
    out = stack.hpo("report", "stack-cli", "--out", str(stack.work / "report"))
    print(tail(out, 3))


def cleanup(stack: Stack, keep_images: bool) -> None:
    stack._stop.set()
    with contextlib.suppress(Exception):
        stack.compose("down", "--volumes", "--remove-orphans", timeout=300, check=False)
    if not keep_images:
        stack.podman("system", "reset", "--force", check=False, timeout=300)
    if stack.service is not None:
        stack.service.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            stack.service.wait(timeout=20)
        if stack.service.poll() is None:
            stack.service.kill()
        (stack.work / "podman-service.pid").unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--work",
        type=Path,
        default=Path("/var/tmp/hpo-stack"),
        help="Folder for podman's store, the socket and the specs (default: %(default)s).",
    )
    parser.add_argument("--keep-images", action="store_true", help="Keep the built images for the next run.")
    parser.add_argument("--no-faults", action="store_true", help="Skip the fault injection.")
    parser.add_argument(
        "--keep-running",
        action="store_true",
        help="Leave the stack and podman's service up at the end, for a look (then run without it to clean up).",
    )
    parser.add_argument("--json", type=Path, help="Also write the phase times and fault outcomes here.")
    args = parser.parse_args(argv)
    for tool in ("podman", "mmdebstrap", "docker-compose"):
        if shutil.which(tool) is None:
            print(
                f"stack test: {tool} is not installed (apt-get install podman runc mmdebstrap docker-compose)",
                file=sys.stderr,
            )
            return 2
    if not any(Path(p).exists() for p in DNS_PLUGINS):
        print(
            "stack test: podman's networks need a DNS plugin for the services to find each other "
            "(apt-get install golang-github-containernetworking-plugin-dnsname)",
            file=sys.stderr,
        )
        return 2
    stack = Stack(args.work)
    faults: dict[str, str] = {}
    try:
        with stack.phase("podman"):
            start_podman(stack)
        with stack.phase("images"):
            build_images(stack, sys.executable)
        write_env(stack)
        stack.compose("down", "--volumes", "--remove-orphans", check=False)  # a --keep-running run's
        with stack.phase("stack up"):
            up(stack)
        with stack.phase("hpo doctor"):
            check_doctor(stack)
        with stack.phase("study via the hpo service"):
            check_cli_study(stack)
        with stack.phase("study via ray:// from the host"):
            check_ray_client(stack)
        with stack.phase("study as a Ray job through 8265"):
            check_jobs_api(stack)
        with stack.phase("dashboard and auth"):
            check_dashboard(stack)
        if not args.no_faults:
            for name, fault in [
                ("worker killed", fault_worker_killed),
                ("MLflow stopped", fault_mlflow_stopped),
                ("PostgreSQL restarted", fault_postgres_restarted),
                ("driver killed", fault_driver_killed),
            ]:
                with stack.phase(f"fault: {name}"):
                    faults[name] = fault(stack)
                    print(f"   {faults[name]}")
        with stack.phase("down, up: state kept"):
            check_volumes(stack)
    except (StackError, subprocess.TimeoutExpired) as exc:
        diagnosis = stack.work / "stack-failure.log"
        with contextlib.suppress(Exception):
            diagnosis.write_text(
                "\n".join(
                    [
                        stack.compose("ps", check=False).stdout,
                        stack.compose("logs", "--no-color", "--tail", "40", check=False).stdout,
                        stack.podman(
                            "exec",
                            stack.container("ray-head"),
                            "sh",
                            "-c",
                            "tail -n 25 /tmp/ray/session_latest/logs/ray_client_server*",
                            check=False,
                        ).stdout,
                    ]
                )
            )
        print(f"stack test failed: {exc}\n(the services' state and logs: {diagnosis})", file=sys.stderr)
        return 1
    finally:
        if args.keep_running:
            print(
                f"left running: DOCKER_HOST={stack.env['DOCKER_HOST']} CONTAINERS_CONF={stack.env['CONTAINERS_CONF']} "
                f"CONTAINERS_STORAGE_CONF={stack.env['CONTAINERS_STORAGE_CONF']}; storage {stack.storage}"
            )
        else:
            with stack.phase("clean up"):
                cleanup(stack, args.keep_images)
        print("\n| phase | seconds |\n|---|---|")
        for name, seconds in stack.timings:
            print(f"| {name} | {seconds:.0f} |")
        for name, seen in faults.items():
            print(f"- {name}: {seen}")
        if args.json:
            args.json.write_text(json.dumps({"timings": stack.timings, "faults": faults}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
