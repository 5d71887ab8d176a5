"""Trials as Ray tasks, on this machine or on a Ray cluster.

The driver keeps the study (ask/tell, pruning decisions, the only writer of the store); Ray runs
each trial as a task with ``num_cpus``/``num_gpus`` resources, so fractional GPUs pack several
trials onto one device. Per-epoch values travel to the driver through a small async actor, the
:class:`PruningBroker`: a worker reports an epoch and waits for the driver's decision, so Optuna's
pruners behave exactly as in a single process (Ray Tune's Optuna searcher, by contrast, disables
them).

A task whose worker process dies (killed, out of memory, node lost) surfaces as a ``lost``
outcome; the driver fails the trial with the reason and re-queues its configuration. Trials that
use a GPU get a fresh process each (``max_calls=1``), so GPU memory is returned to the device
between trials; CPU-only trials reuse warm workers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterable
from typing import Any

import ray
import ray.exceptions

from hpo.data import Splits
from hpo.data.batches import Loading
from hpo.errors import HpoError, describe
from hpo.output import ray_logging_level
from hpo.running.executor import EpochCallback, Outcome, TrialJob, execute_group
from hpo.running.harness import Precision
from hpo.running.records import WORKER
from hpo.spec import ObjectiveSpec
from hpo.user_code import CODE_EXCLUDES

#: The resource Ray gives the head node only (``ray._common.constants.HEAD_NODE_RESOURCE_NAME``).
HEAD_NODE_RESOURCE = "node:__internal_head__"
#: Seconds a worker waits for the driver's pruning decision before training on regardless.
DECISION_TIMEOUT = 120.0
#: Tries of a ray:// connection: Ray's client proxy sometimes fails to fork the session's server
#: (ray-project/ray#63202; docker/compose.yaml also disables gRPC's fork support on the head).
CLIENT_ATTEMPTS = 3

_LOST = (
    ray.exceptions.WorkerCrashedError,
    ray.exceptions.NodeDiedError,
    ray.exceptions.OutOfMemoryError,
    ray.exceptions.LocalRayletDiedError,
    ray.exceptions.TaskCancelledError,
    ray.exceptions.ObjectLostError,
)


def in_ray_job() -> bool:
    """Whether this process is a Ray job's entrypoint (``hpo submit --cluster`` on the head):
    Ray's job supervisor gives it the job's configuration in this variable."""
    return bool(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"))


def connect(address: str | None = None, *, num_cpus: int | None = None, code_dir: str | None = None) -> bool:
    """Connect to the Ray cluster at ``address`` (else ``$RAY_ADDRESS``), or start a local Ray
    instance. ``code_dir``, the user's code folder, is shipped with the job as Ray's working
    directory, so workers import the user's model and data as the driver does. Returns whether
    this call started Ray (and so should shut it down). Inside a Ray job the job's own working
    directory is the code's, and none is added."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address.startswith("ray://"):
        try:
            import grpc  # noqa: F401
        except ImportError:
            raise HpoError(
                f"{address} is a Ray client address, and Ray's client is not installed: "
                "pip install 'dropout-hpo[cluster]'"
            ) from None
    # Inside a Ray job the job's working_dir already reaches every task, and Ray refuses to merge
    # a second one into it ("Failed to merge the Job's runtime env").
    ship = code_dir and not in_ray_job()
    runtime_env = {"working_dir": code_dir, "excludes": CODE_EXCLUDES} if ship else None
    # ray.init replaces the SIGTERM handler with sys.exit, which would skip the driver's clean stop
    # (abandon and re-queue running trials, close MLflow runs, release the lease): keep ours.
    on_main_thread = threading.current_thread() is threading.main_thread()
    sigterm = signal.getsignal(signal.SIGTERM) if on_main_thread else None
    try:
        for attempt in range(1, CLIENT_ATTEMPTS + 1):
            try:
                ray.init(
                    address=address,
                    num_cpus=None if address else num_cpus,
                    include_dashboard=False,
                    log_to_driver=False,
                    configure_logging=True,
                    logging_level=ray_logging_level(),
                    runtime_env=runtime_env,
                )
                break
            except ConnectionAbortedError as exc:
                if "Initialization failure from server" not in str(exc) or attempt == CLIENT_ATTEMPTS:
                    raise
                print(
                    f"Ray's client server at {address} failed to start this session's server (a known Ray "
                    f"race, ray-project/ray#63202); connecting again ({attempt + 1}/{CLIENT_ATTEMPTS})",
                    file=sys.stderr,
                    flush=True,
                )
    except ConnectionError as exc:
        hint = (
            ""
            if address and address.startswith("ray://")
            else (
                "; a machine that is not a Ray node reaches the cluster through Ray's client: --ray-address ray://HEAD:10001"
            )
        )
        raise HpoError(f"cannot reach the Ray cluster at {address} ({describe(exc)}){hint}") from None
    except Exception as exc:
        if code_dir and ("working_dir" in str(exc).lower() or "package" in str(exc).lower()):
            raise HpoError(
                f"cannot ship the code folder {code_dir} to Ray workers ({describe(exc)}); point "
                "--code-dir at a folder holding only your code"
            ) from exc
        raise
    finally:
        if on_main_thread and sigterm is not None:
            signal.signal(signal.SIGTERM, sigterm)
    return True


@ray.remote(num_cpus=0)
def _importable(class_path: str) -> str:
    """Empty when a worker can import ``class_path``'s module, else why not."""
    import importlib

    try:
        importlib.import_module(class_path.rpartition(".")[0])
    except Exception as exc:
        return describe(exc)
    return ""


def check_workers_import(class_path: str) -> None:
    """Refuse, with the reason, a Ray instance (started by someone else) whose workers cannot
    import the user's model."""
    why = ray.get(_importable.remote(class_path))
    if why:
        raise HpoError(
            f"Ray workers cannot import {class_path} ({why}): Ray was started without your code; "
            "start it with ray.init(runtime_env={'working_dir': CODE_DIR}) or let hpo start it"
        )


@ray.remote(num_cpus=0)
class PruningBroker:
    """Per-epoch reports from workers to the driver, and the driver's prune decisions back."""

    def __init__(self) -> None:
        self._reports: list[tuple[int, int, float]] = []
        self._started: list[tuple[int, dict[str, Any]]] = []
        self._epochs: list[tuple[int, dict[str, float]]] = []
        self._decisions: dict[tuple[int, int], asyncio.Future] = {}
        self._news = asyncio.Event()

    async def started(self, number: int, worker: dict[str, Any]) -> None:
        self._started.append((number, worker))
        self._news.set()

    async def epoch(self, number: int, entry: dict[str, float]) -> None:
        """Called by a worker with every epoch's metrics (before its pruning report)."""
        self._epochs.append((number, entry))
        self._news.set()

    async def report(self, number: int, step: int, value: float) -> bool:
        """Called by a worker after each epoch; returns whether to prune."""
        future = asyncio.get_running_loop().create_future()
        self._decisions[(number, step)] = future
        self._reports.append((number, step, value))
        self._news.set()
        try:
            return await asyncio.wait_for(future, DECISION_TIMEOUT)
        except TimeoutError:
            return False
        finally:
            self._decisions.pop((number, step), None)

    async def drain(self, timeout: float) -> tuple[list, list, list]:
        """Pending pruning reports, trial starts and epochs, waiting up to ``timeout`` seconds
        for the first."""
        if not (self._reports or self._started or self._epochs):
            try:
                await asyncio.wait_for(self._news.wait(), timeout)
            except TimeoutError:
                pass
        self._news.clear()
        news = self._reports, self._started, self._epochs
        self._reports, self._started, self._epochs = [], [], []
        return news

    async def wake(self) -> None:
        """End a waiting drain now. An async actor runs calls in no set order, so the driver
        reads that drain before it asks for another, rather than running two at once."""
        self._news.set()

    async def decide(self, decisions: list[tuple[int, int, bool]]) -> None:
        for number, step, prune in decisions:
            future = self._decisions.get((number, step))
            if future is not None and not future.done():
                future.set_result(prune)


class RemoteTrial:
    """The part of ``optuna.Trial`` the Lightning pruning callback uses, answered by the driver
    through the broker."""

    def __init__(self, broker: Any, number: int) -> None:
        self.broker, self.number = broker, number
        self._prune = False

    def report(self, value: float, step: int) -> None:
        self._prune = ray.get(self.broker.report.remote(self.number, step, float(value)))

    def should_prune(self) -> bool:
        return self._prune


def _worker_info(cpus: float) -> dict[str, Any]:
    gpu_ids = ray.get_gpu_ids()
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "node": ray.get_runtime_context().get_node_id()[:12],
        "gpus": [str(g) for g in gpu_ids],
        "cpus": cpus,
    }


@ray.remote(max_retries=0)
def _run_remote(
    configs,
    data: Splits,
    objectives,
    broker,
    numbers: list[int],
    prune: bool,
    accelerator: str,
    cpus: float,
    loading: str,
    precision: str,
) -> list[Outcome]:
    """One trial, or a vectorised group of trials (``numbers``, one per config)."""
    import torch

    torch.set_num_threads(max(1, int(cpus)))
    worker = _worker_info(cpus)
    for number in numbers:
        ray.get(broker.started.remote(number, worker))
    return execute_group(
        configs,
        data,
        objectives,
        [RemoteTrial(broker, number) for number in numbers] if prune else None,
        accelerator,
        on_epoch=lambda k, entry: ray.get(broker.epoch.remote(numbers[k], entry)),
        loading=loading,
        precision=precision,
    )


class RayBackend:
    """Runs up to ``workers`` trials (or vectorised groups) at once as Ray tasks.

    Args:
        workers: Concurrent trials.
        cpus_per_trial: Ray ``num_cpus`` of each trial task (and its torch thread count).
        gpus_per_trial: Ray ``num_gpus`` of each trial; fractions pack trials onto a GPU
            (0.25: four trials per GPU). Above 0 each trial trains on its GPU.
        loading: How batches reach the device (:func:`hpo.data.batches.make_loaders`).
        precision: How training arithmetic runs (:data:`hpo.running.harness.Precision`).
    """

    def __init__(
        self,
        data: Splits,
        objectives: list[ObjectiveSpec],
        *,
        prune: bool,
        workers: int,
        cpus_per_trial: float = 1.0,
        gpus_per_trial: float = 0.0,
        loading: Loading = "auto",
        precision: Precision = "32",
    ) -> None:
        self.objectives, self.prune, self.slots = objectives, prune, workers
        self.on_epoch: EpochCallback | None = None
        self.cpus, self.gpus, self.loading, self.precision = cpus_per_trial, gpus_per_trial, loading, precision
        self.threads = max(1, int(cpus_per_trial))
        self.accelerator = "gpu" if gpus_per_trial > 0 else "cpu"
        self._data_ref = ray.put(data)
        # On the head node, as Ray Serve places its controller: a worker node lost mid-study must
        # not take the broker, and with it the driver, down. (With soft affinity to the driver's
        # node it once ran on a worker, whose kill in the stack test ended the study.)
        on_head = {HEAD_NODE_RESOURCE: 0.001} if HEAD_NODE_RESOURCE in ray.cluster_resources() else {}
        self._broker = PruningBroker.options(resources=on_head).remote()
        self._tasks: dict[ray.ObjectRef, list[TrialJob]] = {}
        self._jobs: dict[int, TrialJob] = {}
        self._drain: ray.ObjectRef | None = None
        self._options = {"num_cpus": cpus_per_trial, "num_gpus": gpus_per_trial}
        if gpus_per_trial > 0:
            self._options["max_calls"] = 1

    def start(self, jobs: list[TrialJob]) -> None:
        ref = _run_remote.options(**self._options).remote(
            [job.config for job in jobs],
            self._data_ref,
            self.objectives,
            self._broker,
            [job.trial.number for job in jobs],
            self.prune,
            self.accelerator,
            self.cpus,
            self.loading,
            self.precision,
        )
        self._tasks[ref] = jobs
        for job in jobs:
            self._jobs[job.trial.number] = job

    def wait(self, timeout: float) -> list[tuple[TrialJob, Outcome]]:
        """Block until a trial ends or a worker reports an epoch (answered at once), at most
        ``timeout`` seconds; return the trials that ended."""
        if self._drain is None:
            self._drain = self._broker.drain.remote(timeout)
        ready, _ = ray.wait([self._drain, *self._tasks], num_returns=1, timeout=timeout)
        if self._drain in ready:
            self._answer(*ray.get(self._drain))
            self._drain = None
        ended, _ = ray.wait(list(self._tasks), num_returns=len(self._tasks), timeout=0) if self._tasks else ([], [])
        if ended:  # their last epochs may wait in the drain in flight, or in the broker
            if self._drain is not None:
                self._broker.wake.remote()
                self._answer(*ray.get(self._drain))
                self._drain = None
            self._answer(*ray.get(self._broker.drain.remote(0)))
        done = []
        for ref in ended:
            jobs = self._tasks.pop(ref)
            for job in jobs:
                self._jobs.pop(job.trial.number, None)
            done.extend(zip(jobs, self._outcomes(ref, len(jobs))))
        return done

    def _answer(
        self,
        reports: list[tuple[int, int, float]],
        started: list[tuple[int, dict[str, Any]]],
        epochs: list[tuple[int, dict[str, float]]],
    ) -> None:
        """Record where trials run; pass epochs on; report workers' selection metric to Optuna
        and send back whether each trial should stop."""
        for number, worker in started:
            if number in self._jobs:
                self._jobs[number].trial.set_user_attr(WORKER, worker)
        if self.on_epoch is not None:
            for number, entry in epochs:
                self.on_epoch(number, entry)
        decisions = []
        for number, step, value in reports:
            job = self._jobs.get(number)
            if job is None:
                continue
            job.trial.report(value, step)
            decisions.append((number, step, job.trial.should_prune()))
        if decisions:
            self._broker.decide.remote(decisions)

    @staticmethod
    def _outcomes(ref: ray.ObjectRef, members: int) -> list[Outcome]:
        try:
            return ray.get(ref)
        except _LOST as exc:
            failure = Outcome("lost", reason=f"worker lost: {describe(exc)}")
        except ray.exceptions.RayTaskError as exc:
            failure = Outcome("error", reason=f"{type(exc.cause).__name__}: {exc.cause}")
        except ray.exceptions.RayError as exc:
            failure = Outcome("lost", reason=f"worker lost: {describe(exc)}")
        return [failure] * members

    def cancel(self, jobs: Iterable[TrialJob]) -> None:
        for ref in list(self._tasks):
            ray.cancel(ref, force=True)
        self._tasks.clear()
        self._jobs.clear()


@ray.remote(num_gpus=1, max_retries=0)
def _probe_remote(configs, data: Splits, objectives, precision: str):
    from hpo.running.packing import probe

    return probe(configs, data, objectives, precision)


def auto_gpus_per_trial(
    spec: Any, seed: int, data: Splits, group_size: int, cpus_per_trial: float, precision: Precision = "32"
) -> tuple[float, str]:
    """``--gpus-per-trial auto``: probe one representative trial (the spec's ``recommended``
    baseline, or a group of ``group_size`` of them) alone on a whole GPU of the cluster, at the
    study's ``precision``, and return Ray's ``num_gpus`` per trial and a line saying what was
    measured and chosen."""
    from hpo.running.group import group_key
    from hpo.running.packing import gpu_fraction, trials_per_gpu
    from hpo.space import baseline_config

    resources = ray.cluster_resources()
    gpus = resources.get("GPU", 0)
    if gpus < 1:
        raise HpoError(
            "--gpus-per-trial auto measures a trial on a GPU, and the Ray cluster has none "
            "(use --gpus-per-trial 0 to train on CPUs)"
        )
    config = baseline_config(spec, "recommended", seed)
    members = group_size if group_key(config) is not None else 1
    configs = [dataclasses.replace(config, seed=config.seed + k) for k in range(members)]
    try:
        measured = ray.get(_probe_remote.remote(configs, data, spec.objective, precision))
    except ray.exceptions.RayTaskError as exc:
        raise HpoError(f"--gpus-per-trial auto: the probe failed: {exc.cause}") from None
    per_gpu = trials_per_gpu(measured, resources.get("CPU", 1) / gpus, cpus_per_trial)
    fraction = gpu_fraction(per_gpu)
    what = f"a group of {members} trials" if members > 1 else "one trial"
    note = (
        f"--gpus-per-trial auto: {what} alone on a {measured.device} used "
        f"{measured.footprint_bytes / 2**20:,.0f} MiB of {measured.total_bytes / 2**30:,.0f} GiB and kept it "
        f"busy {measured.utilization:.0%} of the time → {per_gpu} per GPU (--gpus-per-trial {fraction:g})"
    )
    return fraction, note
