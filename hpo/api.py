"""The library entry points behind the CLI: submit a search space, resume a study; and the read
side, from :mod:`hpo.queries` (which imports no torch, so the CLI's read verbs import it there):
:func:`studies`, :func:`status`, :func:`best`, :func:`delete`, returning typed data
(:class:`StudySummary`, :class:`StudyStatus`, :class:`~hpo.running.records.StoredTrial`).

Everything is validated (spec, data, store, study name, execution options) before the study
store is written, so bad input leaves the store as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from hpo.data import DataSource, TrialData, load_data, load_user_data
from hpo.data.batches import Loading
from hpo.errors import HpoError, SpecError
from hpo.params import Baseline, asked_together, ordered_choices, settle_numeric_choices
from hpo.queries import StudyStatus, StudySummary, best, delete, status, studies  # noqa: F401 - the read side
from hpo.running.executor import Backend, LocalBackend, ProgressCallback, RunSummary, run_study
from hpo.running.harness import PRECISIONS, Precision
from hpo.running.lease import driving
from hpo.running.records import (
    WARM_START,
    StoredTrial,  # noqa: F401 - what the read side returns
)
from hpo.running.study import (
    StudyHandle,
    baseline_attrs,
    clear_drain,
    create_study,
    load_study,
    name_metrics,
    reconcile,
    set_budget,
)
from hpo.space import baseline_fixed, baseline_params, schedule_warm_starts
from hpo.spec import UNPRUNED_SAMPLERS, Spec, UserDataSpec, parse_spec, read_spec_file
from hpo.tracking import Tracking, tracked
from hpo.user_code import UserCodeError, add_code_dir

if TYPE_CHECKING:
    from hpo.cluster.jobs import Cluster, StudyJob
    from hpo.models.groups import SiteSetting

log = logging.getLogger("hpo")


@dataclass(frozen=True)
class Execution:
    """Where and how trials run.

    Args:
        executor: ``local`` runs trials one after another in this process; ``ray`` runs them as
            Ray tasks; ``auto`` picks Ray when there is more than one worker, a GPU per trial or
            a Ray address, and ``local`` otherwise.
        workers: Trials running at once (Ray only).
        cpus_per_trial: CPUs each Ray trial task reserves (and its torch threads; default 1), and
            the torch threads of in-process trials (default: by the model's size,
            :mod:`hpo.running.threads`).
        gpus_per_trial: GPUs each Ray trial task reserves; fractions share a GPU (0.25: four
            trials per GPU), whole numbers above 1 are allowed. ``"auto"`` measures one trial
            (or group) alone on a GPU and packs as many per GPU as its memory footprint, GPU
            utilisation and the CPUs allow (:mod:`hpo.running.packing`).
        max_retries: Times a configuration whose worker died is queued again.
        ray_address: Ray cluster to use (else ``$RAY_ADDRESS``, else a local Ray instance).
        accelerator: Lightning accelerator for in-process trials (``auto``, ``cpu``, ``gpu``).
        group_size: Trials trained together as one vectorised model (:mod:`hpo.running.group`; MLP
            search spaces). Each group takes one worker slot and one ``gpus_per_trial`` share.
            ``"auto"`` (the default): :data:`AUTO_GROUP_SIZE` for a built-in MLP trained in this
            process on a CPU, 1 otherwise (:func:`settle_group_size`).
        loading: How batches reach the device: ``auto`` holds the data on it when it fits
            (:mod:`hpo.data.batches`), ``dataloader`` copies each batch from host memory (the
            benchmark's baseline), ``resident`` insists. Seeded trials compute the same either way.
        precision: How training arithmetic runs: ``32`` (float32), ``tf32`` (TensorFloat-32
            matrix products on GPUs that have them) or ``bf16`` (Lightning's bf16 mixed
            precision); see :data:`hpo.running.harness.Precision`. The faster two trade a little numerical
            precision for speed on a GPU; on a CPU ``tf32`` changes nothing and ``bf16`` is
            usually slower.
    """

    executor: Literal["auto", "local", "ray"] = "auto"
    workers: int = 1
    cpus_per_trial: float | None = None
    gpus_per_trial: float | Literal["auto"] = 0.0
    max_retries: int = 1
    ray_address: str | None = None
    accelerator: str = "auto"
    group_size: int | Literal["auto"] = "auto"
    loading: Loading = "auto"
    precision: Precision = "32"

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise HpoError(f"workers must be >= 1, got {self.workers}")
        if self.cpus_per_trial is not None and self.cpus_per_trial <= 0:
            raise HpoError(f"cpus-per-trial must be > 0, got {self.cpus_per_trial}")
        gpus = self.gpus_per_trial
        if gpus != "auto" and (not isinstance(gpus, (int, float)) or gpus < 0 or (gpus > 1 and gpus != int(gpus))):
            raise HpoError(f"gpus-per-trial must be 'auto', a fraction in (0, 1] or a whole number, got {gpus!r}")
        if self.precision not in PRECISIONS:
            raise HpoError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.group_size != "auto" and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise HpoError(f"group-size must be 'auto' or a whole number >= 1, got {self.group_size!r}")
        if self.max_retries < 0:
            raise HpoError(f"max-retries must be >= 0, got {self.max_retries}")
        if self.executor == "local" and (self.workers > 1 or self.gpus_per_trial == "auto" or self.gpus_per_trial > 0):
            raise HpoError(
                "the local executor runs one trial at a time: use --executor ray for "
                "--workers above 1 or --gpus-per-trial"
            )

    @property
    def uses_ray(self) -> bool:
        if self.executor != "auto":
            return self.executor == "ray"
        return (
            self.workers > 1
            or self.gpus_per_trial == "auto"
            or self.gpus_per_trial > 0
            or bool(self.ray_address)
            or bool(os.environ.get("RAY_ADDRESS"))
        )


#: Trials per vectorised group that ``group_size="auto"`` trains for an MLP on a CPU. Measured
#: (docs/performance.md, "Against Ray Tune"): a trial in a group of 5 costs 0.39-0.49 of a trial
#: alone on the digits MLP, while on FCNet a group of 5 needed 1.46-1.92x the trials of one trial
#: at a time for the same regret on three data sets of four (docs/reports/search-efficiency):
#: less wall time to the same result there.
AUTO_GROUP_SIZE = 5


def settle_group_size(spec: Spec, execution: Execution) -> tuple[Execution, str | None]:
    """``execution`` with ``group_size="auto"`` made a number for ``spec``, and the line that
    says so when it chose groups. Groups only where they were measured to pay: a built-in MLP
    trained in this process on a CPU (on a GPU, or with Ray workers, a trial trains alone), and
    not when ``epoch_time`` is an objective (a member's is its group's)."""
    if execution.group_size != "auto":
        return execution, None
    groups = (
        not spec.user_model
        and spec.model.arch == "mlp"
        and not execution.uses_ray
        and _on_cpu(execution.accelerator)
        and all(o.metric != "epoch_time" for o in spec.objective)
    )
    size = AUTO_GROUP_SIZE if groups else 1
    note = (
        f"trials train in vectorised groups of {size} (an MLP on a CPU; --group-size 1 trains one at a time)"
        if size > 1
        else None
    )
    return dataclasses.replace(execution, group_size=size), note


def _on_cpu(accelerator: str) -> bool:
    """Whether Lightning's ``accelerator`` trains on the CPU here."""
    if accelerator == "cpu":
        return True
    if accelerator != "auto":
        return False
    import torch

    return not (torch.cuda.is_available() or torch.backends.mps.is_available())


@contextlib.contextmanager
def _backend(
    spec: Spec,
    seed: int,
    data: TrialData,
    execution: Execution,
    on_note: Callable[[str], None] = log.info,
    code_dir: str | None = None,
) -> Iterator[Backend]:
    """The backend that runs trials, opened before the study is written so that a cluster
    that cannot run them (``--gpus-per-trial auto`` without a GPU) leaves the store as it was.
    A user model's ``code_dir`` is shipped to Ray workers."""
    prune = not spec.multi_objective and spec.active_pruner.name != "none"
    if not execution.uses_ray:
        from hpo.running.threads import thread_choice, torch_threads

        choice = thread_choice(spec, data, execution.cpus_per_trial, execution.group_size)
        on_note(choice.describe())
        with torch_threads(choice.threads):
            yield LocalBackend(
                data,
                spec.objective,
                prune,
                execution.accelerator,
                execution.loading,
                execution.precision,
                choice.threads,
            )
        return
    import ray

    from hpo.running.ray_executor import (
        RayBackend,
        auto_gpus_per_trial,
        check_workers_import,
        connect,
    )

    if spec.user_model and execution.gpus_per_trial == "auto":
        raise HpoError(
            "--gpus-per-trial auto measures the built-in networks; give your model's share of a GPU "
            "as a number (0.25: four trials per GPU)"
        )
    started = connect(execution.ray_address, code_dir=code_dir if spec.user_model else None)
    try:
        if spec.user_model:
            check_workers_import(spec.model.class_path)
        gpus = execution.gpus_per_trial
        if gpus == "auto":
            gpus, note = auto_gpus_per_trial(
                spec, seed, data, execution.group_size, execution.cpus_per_trial or 1.0, execution.precision
            )
            on_note(note)
        yield RayBackend(
            data,
            spec.objective,
            prune=prune,
            workers=execution.workers,
            cpus_per_trial=execution.cpus_per_trial or 1.0,
            gpus_per_trial=gpus,
            loading=execution.loading,
            precision=execution.precision,
        )
    finally:
        if started:
            ray.shutdown()


def resolve_code_dir(spec: Spec, spec_path: Path, override: str | Path | None = None) -> str | None:
    """The user's code folder as an absolute path: ``override`` (``--code-dir``), else the spec's
    ``code_dir`` relative to the spec file, else the spec file's folder. ``None`` for a spec of
    built-in parts only."""
    if not spec.user_model and not isinstance(spec.data, UserDataSpec):
        return None
    if override is not None:
        folder = Path(override)
    elif spec.code_dir is not None:
        folder = spec_path.parent / spec.code_dir
    else:
        folder = spec_path.parent
    if not folder.is_dir():
        raise SpecError(spec_path, "code_dir", f"{folder} is not a folder")
    return str(folder.resolve())


def load_trial_data(spec: Spec, code_dir: str | None = None) -> TrialData:
    """The study's data: a built-in set, or the user's own (imported from ``code_dir``)."""
    if isinstance(spec.data, UserDataSpec):
        return load_user_data(DataSource(spec.data.model_dump(), code_dir))
    return load_data(spec.data)


def study_data(handle: StudyHandle) -> TrialData:
    """A stored study's data, the user's code imported from the folder it was submitted with
    (``hpo evaluate``, ``retrain``, ``sync``)."""
    try:
        add_code_dir(handle.code_dir)
        return load_trial_data(handle.spec, handle.code_dir)
    except UserCodeError as exc:
        raise SpecError(f"study {handle.name!r}", exc.key, exc.problem) from exc


def prepare(
    spec: Spec,
    source: str | Path,
    code_dir: str | None,
    on_note: Callable[[str], None] = log.info,
    on_warning: Callable[[str], None] = log.warning,
) -> TrialData:
    """Load the data and, for a user model, check it before anything is stored: import it, build
    it at the centre of the space, match the groups to its sites and train it on one batch
    (:func:`~hpo.running.user_check.check_user_model`). Problems raise :class:`SpecError`
    naming ``source`` and the key."""
    try:
        add_code_dir(code_dir)
        data = load_trial_data(spec, code_dir)
        if not spec.user_model:
            return data
        from hpo.models.groups import constrained_layers
        from hpo.running.user_check import check_user_model

        checked = check_user_model(spec, data)
    except UserCodeError as exc:
        raise SpecError(source, exc.key, exc.problem) from exc
    built = checked.built
    grouped = sum(1 for s in built.settings if s.group is not None)
    layers = {
        path for entry in spec.dropout.max_norm.values() for path, _ in constrained_layers(built.network, entry.match)
    }
    on_note(
        f"model {spec.model.class_path}: {len(built.settings)} dropout sites, {grouped} of them in "
        f"{len(spec.dropout.groups)} groups"
        + (f"; max-norm on {len(layers)} layer{'s' if len(layers) > 1 else ''}" if layers else "")
        + " (`hpo sites` lists them)"
    )
    for line in checked.warnings:
        on_warning(line)
    return data


@dataclass(frozen=True)
class SiteReport:
    """What ``hpo sites`` shows: the model built at the centre of the space, its sites and what
    the spec's groups make of them, the layers max-norm would hold, and the warnings."""

    model: str
    settings: list[SiteSetting]
    max_norm: dict[str, list[str]]
    warnings: list[str]


def sites(space: str | Path, code_dir: str | Path | None = None) -> SiteReport:
    """Find the dropout sites of the model a search space names, built at the centre of the
    space (a user model, or a built-in network), and say which group matches each. Unlike
    :func:`submit`, a pattern that matches nothing or a site left out is a warning here."""
    import torch

    from hpo.models.groups import SiteSetting, constrained_layers
    from hpo.models.sites import probe
    from hpo.running.trial import build_network
    from hpo.running.user_check import (
        argument_effects,
        build_checked,
        dead_argument_problems,
        searched_through_arguments,
        site_problems,
        site_warnings,
    )
    from hpo.running.user_trial import example_batch
    from hpo.space import centre_config

    path = Path(space)
    spec = parse_spec(read_spec_file(path), source=path)
    folder = resolve_code_dir(spec, path, code_dir)
    try:
        add_code_dir(folder)
        data = load_trial_data(spec, folder)
        config = centre_config(spec)
        torch.manual_seed(0)
        if not spec.user_model:
            net = build_network(config, data)
            table = probe(net, lambda m: m(data.train.x[:8]))
            settings = [SiteSetting(s, None, s.rate, None) for s in table.sites]
            return SiteReport(spec.model.arch, settings, {}, table.warnings())
        batch = example_batch(data)
        built = build_checked(config, batch, strict=False)
        effects = argument_effects(spec, built, batch)
    except UserCodeError as exc:
        raise SpecError(path, exc.key, exc.problem) from exc
    problems = [
        f"{key}: {problem}" for key, problem in site_problems(spec, built) + dead_argument_problems(spec, effects)
    ]
    through = searched_through_arguments(effects)
    problems += [
        f"{s.site.path}: functional dropout that no group matches keeps its rate {s.rate:g}"
        for s in built.settings
        if s.group is None and s.site.kind == "functional" and s.site.path not in through
    ]
    layers = {
        name: [p for p, _ in constrained_layers(built.network, entry.match)]
        for name, entry in spec.dropout.max_norm.items()
    }
    return SiteReport(spec.model.class_path, built.settings, layers, site_warnings(spec, built, effects) + problems)


def submit(
    space: str | Path,
    *,
    trials: int | None = None,
    timeout: float | None = None,
    study_name: str | None = None,
    storage: str | None = None,
    seed: int | None = None,
    baselines: bool = True,
    execution: Execution = Execution(),
    tracking: Tracking = Tracking(),
    on_progress: ProgressCallback | None = None,
    on_start: Callable[[StudyHandle], None] | None = None,
    on_warning: Callable[[str], None] = log.warning,
    on_note: Callable[[str], None] = log.info,
    code_dir: str | Path | None = None,
) -> tuple[StudyHandle, RunSummary]:
    """Create a study from the search-space file ``space`` and run it.

    Args:
        trials: Budget of finished trials (default: the spec's ``budget.trials``).
        timeout: Stop starting trials after this many seconds (default: ``budget.timeout``).
        study_name: Default: the spec's ``name``, else the file's stem.
        storage: SQLAlchemy URL of the study store (default ``$HPO_STORAGE`` or
            ``sqlite:///hpo.db``).
        seed: Seeds the sampler and each trial (default: the spec's ``sampler.seed``, else a
            random seed, recorded in the study).
        baselines: Queue the spec's baseline configurations first.
        execution: Workers, resources per trial, retries, Ray address (see :class:`Execution`).
        tracking: Where the study is mirrored in MLflow (see :class:`hpo.tracking.Tracking`).
        on_start: Called once the study exists, before the first trial.
        on_warning: Gets problems that do not stop the study (MLflow unreachable).
        on_note: Gets decisions made for the user (the measured ``--gpus-per-trial auto``) and
            what the check of a user model found.
        code_dir: The user's code (default: the spec's ``code_dir``, else the spec file's folder).
    """
    path = Path(space)
    text = read_spec_file(path)
    spec = parse_spec(text, source=path)
    if not baselines:
        spec = spec.model_copy(update={"baselines": []})
    folder = resolve_code_dir(spec, path, code_dir)
    data = prepare(spec, path, folder, on_note, on_warning)
    if seed is None:
        seed = spec.sampler.seed if spec.sampler.seed is not None else secrets.randbelow(2**31)
    execution = _settled(spec, execution, on_note)
    spec = _numeric_choices_settled(spec, execution, on_note)
    if note := pruning_note(spec):
        on_note(note)
    with _backend(spec, seed, data, execution, on_note, folder) as backend:
        handle = create_study(
            spec,
            text,
            name=study_name or spec.name,
            storage=storage,
            budget=trials or spec.budget.trials,
            seed=seed,
            spec_source=str(path),
            code_dir=folder if spec.user_model else None,
            group_size=execution.group_size,
            first_trials=[
                (baseline_params(spec, kind), baseline_attrs(Baseline(kind, baseline_fixed(spec, kind))))
                for kind in spec.baselines
            ]
            + [(values, {WARM_START: shape}) for shape, values in schedule_warm_starts(spec)],
        )
        with driving(handle.storage, handle.name):
            if on_start is not None:
                on_start(handle)
            return handle, _run(
                handle, data, backend, execution, tracking, timeout or spec.budget.timeout, on_progress, on_warning
            )


def _settled(spec: Spec, execution: Execution, on_note: Callable[[str], None]) -> Execution:
    execution, note = settle_group_size(spec, execution)
    if note:
        on_note(note)
    return execution


def _numeric_choices_settled(spec: Spec, execution: Execution, on_note: Callable[[str], None]) -> Spec:
    settled = settle_numeric_choices(spec, execution.group_size, execution.workers)
    if (
        spec.sampler.numeric_choices == "auto"
        and settled.sampler.numeric_choices == "categorical"
        and ordered_choices(spec)
    ):
        why = " and ".join(asked_together(execution.group_size, execution.workers))
        on_note(
            f"numeric choices are searched as categories {why} "
            "(sampler: {numeric_choices: ordered} searches them by position)"
        )
    return settled


def pruning_note(spec: Spec) -> str | None:
    """What a user should know of pruning with a sampler that learns from complete trials only:
    that it is off by default, or, where the spec asks for a pruner, what that costs."""
    if spec.multi_objective or spec.sampler.name not in UNPRUNED_SAMPLERS:
        return None
    why = f"sampler {spec.sampler.name} learns from complete trials only"
    if spec.pruner is None:
        return f"trials are not pruned: {why} (pruner: {{name: median}} prunes anyway)"
    if spec.active_pruner.name == "none":
        return None
    return (
        f"{why}: a configuration the {spec.active_pruner.name} pruner stops teaches it nothing and may be "
        "proposed again (pruner: {name: none} lets every trial finish)"
    )


def _run(
    handle: StudyHandle,
    data: TrialData,
    backend: Backend,
    execution: Execution,
    tracking: Tracking,
    timeout: float | None,
    on_progress: ProgressCallback | None,
    on_warning: Callable[[str], None],
) -> RunSummary:
    with tracked(handle, tracking, data, on_warning) as tracker:
        summary = run_study(
            handle,
            backend,
            timeout=timeout,
            max_retries=execution.max_retries,
            on_progress=on_progress,
            listener=tracker,
            group_size=execution.group_size,
        )
        if tracker is not None:
            tracker.close(summary.stopped)
    return summary


def resume(
    study_name: str,
    *,
    storage: str | None = None,
    trials: int | None = None,
    timeout: float | None = None,
    execution: Execution = Execution(),
    tracking: Tracking = Tracking(),
    on_progress: ProgressCallback | None = None,
    on_start: Callable[[StudyHandle, list[int]], None] | None = None,
    on_warning: Callable[[str], None] = log.warning,
    on_note: Callable[[str], None] = log.info,
    code_dir: str | Path | None = None,
    take_over: bool = False,
) -> tuple[StudyHandle, RunSummary]:
    """Continue a study until its budget of finished trials is reached.

    Trials left RUNNING by a driver that is gone are failed as abandoned and their
    configurations queued again first. ``trials`` sets a new total budget. ``on_start`` gets the
    study and the numbers of the trials it abandoned. A study that another live driver runs is
    refused (:class:`hpo.running.lease.StudyBusy`); ``take_over`` takes its lease anyway, for a
    driver known to be dead on another host whose heartbeat is not yet stale. With
    ``execution.group_size="auto"`` the study goes on with the group size it was submitted with.
    """
    handle = load_study(study_name, storage)
    folder = str(Path(code_dir).resolve()) if code_dir else handle.code_dir
    data = prepare(handle.spec, f"study {study_name!r}", folder, on_note, on_warning)
    with driving(handle.storage, handle.name, take_over=take_over):
        orphans = reconcile(handle.study, leased=True)
        clear_drain(handle)
        name_metrics(handle)
        if trials is not None:
            set_budget(handle, trials)
        if on_start is not None:
            on_start(handle, orphans)
        if execution.group_size == "auto" and handle.group_size is not None:
            execution = dataclasses.replace(execution, group_size=handle.group_size)
        execution = _settled(handle.spec, execution, on_note)
        if note := pruning_note(handle.spec):
            on_note(note)
        with _backend(handle.spec, handle.seed, data, execution, on_note, folder) as backend:
            return handle, _run(
                handle,
                data,
                backend,
                execution,
                tracking,
                timeout or handle.spec.budget.timeout,
                on_progress,
                on_warning,
            )


def submit_to_cluster(
    space: str | Path,
    cluster: Cluster,
    *,
    driver_args: list[str],
    study_name: str | None = None,
    tracking: bool = True,
    check: bool = True,
    code_dir: str | Path | None = None,
    on_note: Callable[[str], None] = log.info,
    on_warning: Callable[[str], None] = log.warning,
) -> StudyJob:
    """Check the search space ``space`` here, then submit its study's driver to ``cluster`` as a
    Ray job and return at once (:mod:`hpo.cluster.jobs`).

    The spec is validated, and a user model is built and trained on one batch here where its code
    is at hand (``check``), before anything is sent. The folder shipped as the job's working
    directory is the code folder (a user model's) or the spec's own, and must hold the spec.
    ``driver_args`` are the options of ``hpo submit`` the driver runs with on the head; the study
    store and the MLflow server are the head's (``HPO_STORAGE``, ``MLFLOW_TRACKING_URI``).
    """
    path = Path(space)
    text = read_spec_file(path)
    spec = parse_spec(text, source=path)
    folder = resolve_code_dir(spec, path, code_dir)
    if folder is not None and check:
        prepare(spec, path, folder, on_note, on_warning)
    shipped = Path(folder or path.parent).resolve()
    try:
        relative = path.resolve().relative_to(shipped)
    except ValueError:
        raise SpecError(
            path, "code_dir", f"the search space must lie inside the code folder shipped to the cluster, {shipped}"
        ) from None
    name = study_name or spec.name
    args = ["submit", relative.as_posix(), "--study-name", name, *driver_args]
    if folder is not None:
        args += ["--code-dir", "."]
    return cluster.submit(name, args, kind="submit", spec_text=text, working_dir=str(shipped), tracking=tracking)


def resume_on_cluster(
    study_name: str,
    cluster: Cluster,
    *,
    driver_args: list[str],
    tracking: bool = True,
    code_dir: str | Path | None = None,
) -> StudyJob:
    """Submit a driver that resumes study ``study_name`` on ``cluster`` (after ``hpo stop``, or
    a head restart that killed its driver). A user model's ``code_dir`` is shipped again."""
    folder = None if code_dir is None else Path(code_dir).resolve()
    if folder is not None and not folder.is_dir():
        raise HpoError(f"--code-dir {code_dir} is not a folder")
    args = ["resume", study_name, *driver_args] + (["--code-dir", "."] if folder is not None else [])
    return cluster.submit(
        study_name,
        args,
        kind="resume",
        spec_text=None,
        working_dir=None if folder is None else str(folder),
        tracking=tracking,
    )
