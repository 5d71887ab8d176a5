"""How far one driver goes: the real driver (``hpo.running.executor.run_study``), the real study
store (SQLite, or PostgreSQL), the real sampler (TPE as a spec builds it) and pruner (the median
pruner a spec builds) and, optionally, the real MLflow tracker, feeding C simulated concurrent
trials of S seconds; prints one table of how busy the trials were kept and what the driver spent,
a table of the driver's ask against the study's length, and a last line
``utilisation U at C concurrent trials of S s`` (the largest C, its last row).

    python bench/driver_scale.py                                   # C = 16, 64, 256, 1024; S = 10 s
    python bench/driver_scale.py --storage sqlite postgresql://postgres@127.0.0.1:5432/test
    python bench/driver_scale.py --quick                           # the CI size: ~11 s, mostly imports
    python bench/driver_scale.py --pruner none --tracking off --lengths   # no pruning decisions

A row that runs past ``--limit`` seconds (90) is stopped as Ctrl-C stops the driver (its running
trials abandoned) at the driver's next hand-over to the backend, and marked "(limit)": its figures
cover the time up to then.

Only the trials are simulated. :class:`SimulatedBackend` is a ``Backend`` as ``RayBackend`` is:
``start`` returns at once, and each trial runs as an asyncio task in one worker thread: it records
where it runs (the ``worker`` attribute, as a Ray worker does), then sleeps S/E seconds per epoch
and reports each epoch to the driver through a queue, waiting for the driver's pruning decision
as a Ray worker waits on the ``PruningBroker``. The driver's ``wait`` answers them as
``RayBackend.wait`` does: ``on_epoch`` with the epoch's metrics, ``trial.report`` of the selection
metric and ``trial.should_prune``, decisions sent back in one batch. A trial ends as a real one
does: an ``Outcome`` ``pruned`` ("Trial was pruned at epoch k.") or ``complete`` with a
``TrialResult`` (objective values at the best epoch, history, summary), told by the driver's own
``_tell``. The values come from a public benchmark: the LCBench surrogate (YAHPO Gym, an OpenML
task, bench/data/lcbench) of the configuration the driver asked, its 52-epoch validation accuracy
curve read at E evenly spaced epochs: batch size, learning rate, momentum, weight decay, layers,
units and hidden dropout are searched in the spec below over LCBench's ranges and passed to the
surrogate as they were suggested (hidden dropout as ``max_dropout``). Only ``val/acc`` comes from
the benchmark; the other metrics of an epoch are filled in from it so that records are complete.

The first table, one row per store, tracking setting and C (budget ``--rounds`` x C trials):

    finished / budget   finished trials in the store after the run, and the budget
    pruned              of the finished trials, those the pruner stopped
    wall s              the driver's run (``run_study``), from the first ask to the last tell (a
                        row stopped by --limit: to the limit, as every figure of the row)
    utilisation         trial-seconds slept in epochs / (C x the dispatch window): the window
                        runs from the driver's start to the start of the budget's last trial,
                        after which slots empty because the budget is spent, not because the
                        driver is slow (a row stopped by --limit: to the limit); a trial waiting
                        for a pruning decision is not busy
    trials/s            trials started in the window per second (the need is about C / S)
    ask, tell           the driver's ask of one trial (``_ask``: the sampler, the trial's row,
                        its owner and heartbeat, the suggested configuration, its seed and
                        configuration attributes) and tell (``_tell``: metrics, history,
                        ``study.tell``), p50 / p95 in ms
    report              the driver's handling of one epoch (``on_epoch``, ``trial.report``,
                        ``trial.should_prune``), p50 / p95 in ms
    round trip          from a trial's report to the decision reaching it, p50 / p95 in ms
    reports/s           pruning round trips per second
    writes/s            INSERT / UPDATE / DELETE statements on the study store per second (its
                        SQLAlchemy engine: driver, trial heartbeats), and SELECTs after the slash
    tracker             with tracking: the most updates queued in the tracker at once (sampled
                        every 0.25 s) and the seconds its ``close`` took to flush them
    driver busy         share of the wall the driver's thread was not waiting for trials, and how
                        it was spent: ask / tell / reports / reads (``run_study``'s reads of
                        the trial counts and best trials, and its count of finished trials
                        before each start) / the rest, in % of the wall
    CPU                 CPU time over the wall (one core is 100 %) of the driver's thread, of the
                        simulated trials' thread, and of the whole process (with the tracker's,
                        the heartbeats' and the garbage collector's)
    peak RSS            the process's peak resident memory during the row (MiB; the imports
                        alone are a few hundred)

The second table times the driver's ask (``_ask``, as above) in a study that already holds N
finished trials (added with ``study.add_trials``: configurations drawn at random from the same
space, with the surrogate's final value; no intermediate values or attributes), one warm-up ask
and then ``--asks`` timed ones, each told at once; p50 / p95, and the concurrent trials of S
seconds that asks alone at the p50 could feed (S / p50).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import platform
import queue
import resource
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: LCBench's search space as an hpo spec (the ranges of ``public_benchmarks.LCBench.suggest``;
#: hidden dropout below 1, as hpo requires), with the project's default TPE and median pruner.
SPACE = """
name: driver-scale
data: {{dataset: digits, seed: 0}}
model: {{arch: mlp, layers: {{low: 1, high: 5}}, units: {{low: 64, high: 1024, log: true}}}}
dropout:
  variant: inverted
  hidden: {{low: 0.0, high: 0.95}}
training:
  lr: {{low: 1.0e-4, high: 0.1, log: true}}
  momentum: {{low: 0.1, high: 0.99}}
  weight_decay: {{low: 1.0e-5, high: 0.1}}
  batch_size: {{low: 16, high: 512, log: true}}
  epochs: {epochs}
sampler: {{name: tpe, seed: 0}}
pruner: {{name: {pruner}}}
baselines: []
"""
#: Seconds a simulated trial waits for a pruning decision before training on (as a Ray worker).
DECISION_TIMEOUT = 120.0
WORKER_INFO = {"host": "simulated", "pid": os.getpid(), "node": "simulated", "gpus": [], "cpus": 0.0}


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def ms(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{1000 * percentile(values, 50):.1f} / {1000 * percentile(values, 95):.1f}"


# --- The trials' values: LCBench's surrogate ----------------------------------------------------


class Curves:
    """Validation accuracy curves of configurations, from the LCBench surrogate of one task, read
    at ``epochs`` evenly spaced epochs of its 52."""

    def __init__(self, task: str, epochs: int) -> None:
        from public_benchmarks import LCBench

        self.bench = LCBench(task)
        self.bench.load()
        self.at = np.unique(np.round(np.linspace(1, 52, epochs)).astype(int))
        self._lock = threading.Lock()

    @staticmethod
    def row(config: Any) -> list[float]:
        """LCBench's (batch_size, learning_rate, momentum, weight_decay, num_layers, max_units,
        max_dropout) of a suggested configuration."""
        t = config.train
        return [t.batch_size, t.lr, t.momentum, t.weight_decay, len(config.net.units), config.net.units[0]]

    def accuracy(self, config: Any) -> np.ndarray:
        """Validation accuracy (0-1) at each epoch of ``self.at``."""
        rows = np.array([[e, *self.row(config), config.dropout.hidden[0]] for e in self.at], dtype=float)
        with self._lock:
            return np.clip(self.bench._accuracy(rows) / 100, 0.0, 1.0)

    def final(self, configs: list[Any]) -> np.ndarray:
        rows = np.array([[self.at[-1], *self.row(c), c.dropout.hidden[0]] for c in configs], dtype=float)
        return np.clip(self.bench._accuracy(rows) / 100, 0.0, 1.0)


def epoch_entry(epoch: int, accuracy: float, seconds: float) -> dict[str, float]:
    """One epoch's metrics: ``val/acc`` from the benchmark, the rest filled in from it."""
    train = min(1.0, accuracy + 0.02)
    return {
        "epoch": epoch,
        "train/loss": float(-np.log(max(train, 1e-6))),
        "train/acc": float(train),
        "val/loss": float(-np.log(max(accuracy, 1e-6))),
        "val/acc": float(accuracy),
        "epoch_time": seconds,
    }


# --- What a row measures ------------------------------------------------------------------------


@dataclass
class Measures:
    ask: list[float] = field(default_factory=list)
    tell: list[float] = field(default_factory=list)
    report: list[float] = field(default_factory=list)
    round_trip: list[float] = field(default_factory=list)
    reads: float = 0.0
    idle: float = 0.0
    writes: int = 0
    selects: int = 0
    backlog: int = 0
    #: The counts when a row's time limit stopped the driver (before its running trials were
    #: abandoned), which the row reports: (time, driver CPU, process CPU, trials' thread CPU,
    #: writes, selects, idle).
    cut: tuple[float, ...] | None = None
    #: Timed calls the driver's thread is inside (a read there belongs to the call).
    depth: int = 0
    #: (start, [[epoch start, end or None while sleeping]]) of each trial, in time.monotonic().
    trials: dict[int, tuple[float, list[list[Any]]]] = field(default_factory=dict)


class _Timed:
    """Times calls of driver functions made in the driver's thread, into a list of durations, or
    (``into`` None) as reads, unless made inside a timed call or a report (the sampler's reads,
    the pruner's), whose time they are already part of."""

    def __init__(self, measures: Measures) -> None:
        self.measures = measures
        self.undo: list[tuple[Any, str, Any]] = []

    def wrap(self, owner: Any, name: str, into: list[float] | None) -> None:
        original = getattr(owner, name)
        main, measures = threading.main_thread(), self.measures

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if threading.current_thread() is not main or (into is None and measures.depth):
                return original(*args, **kwargs)
            measures.depth += 1
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                spent = time.perf_counter() - start
                measures.depth -= 1
                if into is not None:
                    into.append(spent)
                else:
                    measures.reads += spent

        setattr(owner, name, timed)
        self.undo.append((owner, name, original))

    def restore(self) -> None:
        for owner, name, original in reversed(self.undo):
            setattr(owner, name, original)
        self.undo.clear()


class StopRow(KeyboardInterrupt):
    """The row's time limit: the driver stops as on Ctrl-C (running trials abandoned)."""


class SimulatedBackend:
    """Runs trials as asyncio tasks in one worker thread; each sleeps ``seconds / epochs`` per
    epoch and reports every epoch to the driver, which judges it (see the module)."""

    def __init__(
        self,
        slots: int,
        seconds: float,
        curves: Curves,
        objectives: list[Any],
        prune: bool,
        measures: Measures,
        deadline: float,
    ) -> None:
        from hpo.running.harness import selection_objective

        self.slots, self.seconds, self.curves, self.objectives, self.prune = slots, seconds, curves, objectives, prune
        self.selection = selection_objective(objectives).metric
        self.on_epoch = None
        self.precision = "32"
        self.threads = 1
        self.measures, self.deadline = measures, deadline
        self.stopped_at: float | None = None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._jobs: dict[int, Any] = {}
        self._tasks: dict[int, asyncio.Task] = {}
        self._decisions: dict[tuple[int, int], asyncio.Future] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="simulated-trials")
        self._thread.start()
        self.worker_cpu = self._call(time.thread_time)

    def _call(self, fn: Any) -> Any:
        done: queue.SimpleQueue = queue.SimpleQueue()
        self._loop.call_soon_threadsafe(lambda: done.put(fn()))
        return done.get()

    # The driver's side.

    def start(self, jobs: list[Any]) -> None:
        self._check_limit()
        for job in jobs:
            self._jobs[job.trial.number] = job
            self._loop.call_soon_threadsafe(self._spawn, job.trial.number, job.config)

    def _check_limit(self) -> None:
        """Stop the driver (as Ctrl-C does: running trials abandoned) once the row's time is up;
        checked where the driver hands over, in ``start`` and ``wait``."""
        if time.monotonic() >= self.deadline:
            self.stopped_at = self.deadline
            self.measures.cut = self.counters()
            raise StopRow("the row's time limit")

    def counters(self) -> tuple[float, ...]:
        """Now, the driver's thread's CPU (called in it), the process's, the trials' thread's,
        the store's writes and selects, and the driver's idle time."""
        m = self.measures
        trials_cpu = self._call(time.thread_time) - self.worker_cpu
        return time.monotonic(), time.thread_time(), time.process_time(), trials_cpu, m.writes, m.selects, m.idle

    def wait(self, timeout: float) -> list[tuple[Any, Any]]:
        from hpo.running.records import WORKER

        events = []
        start = time.perf_counter()
        with contextlib.suppress(queue.Empty):
            events.append(self._inbox.get(timeout=timeout))
        self.measures.idle += time.perf_counter() - start
        with contextlib.suppress(queue.Empty):
            while True:
                events.append(self._inbox.get_nowait())
        self._check_limit()
        decisions, done = [], []
        for kind, number, *rest in events:
            job = self._jobs.get(number)
            if job is None:
                continue
            if kind == "started":
                job.trial.set_user_attr(WORKER, WORKER_INFO)
            elif kind == "epoch":
                step, entry = rest
                start = time.perf_counter()
                self.measures.depth += 1
                try:
                    if self.on_epoch is not None:
                        self.on_epoch(number, entry)
                    if self.prune:
                        job.trial.report(entry[self.selection], step)
                        decisions.append((number, step, job.trial.should_prune()))
                finally:
                    self.measures.depth -= 1
                self.measures.report.append(time.perf_counter() - start)
            else:
                done.append((self._jobs.pop(number), rest[0]))
        if decisions:
            self._loop.call_soon_threadsafe(self._decide, decisions)
        return done

    def cancel(self, jobs: Iterable[Any]) -> None:
        for job in jobs:
            task = self._tasks.get(job.trial.number)
            if task is not None:
                self._loop.call_soon_threadsafe(task.cancel)
        self._jobs.clear()

    def close(self) -> None:
        """Stop the worker thread."""
        for task in list(self._tasks.values()):
            self._loop.call_soon_threadsafe(task.cancel)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    # The worker thread's side.

    def _spawn(self, number: int, config: Any) -> None:
        self._tasks[number] = self._loop.create_task(self._trial(number, config))

    def _decide(self, decisions: list[tuple[int, int, bool]]) -> None:
        for number, step, prune in decisions:
            future = self._decisions.get((number, step))
            if future is not None and not future.done():
                future.set_result(prune)

    async def _trial(self, number: int, config: Any) -> None:
        from hpo.running.executor import Outcome
        from hpo.running.harness import TrialResult

        try:
            began = time.monotonic()
            intervals: list[list[Any]] = []
            self.measures.trials[number] = (began, intervals)
            self._inbox.put(("started", number))
            accuracy = self.curves.accuracy(config)
            per_epoch = self.seconds / len(accuracy)
            history: list[dict[str, float]] = []
            for step, value in enumerate(accuracy):
                intervals.append([time.monotonic(), None])
                await asyncio.sleep(per_epoch)
                intervals[-1][1] = time.monotonic()
                entry = epoch_entry(step, float(value), per_epoch)
                history.append(entry)
                if not self.prune:
                    self._inbox.put(("epoch", number, step, dict(entry)))
                    continue
                future = self._loop.create_future()
                self._decisions[(number, step)] = future
                posted = time.monotonic()
                self._inbox.put(("epoch", number, step, dict(entry)))
                try:
                    pruned = await asyncio.wait_for(future, DECISION_TIMEOUT)
                except TimeoutError:
                    pruned = False
                finally:
                    self._decisions.pop((number, step), None)
                self.measures.round_trip.append(time.monotonic() - posted)
                if pruned:
                    self._inbox.put(("done", number, Outcome("pruned", reason=f"Trial was pruned at epoch {step}.")))
                    return
            self._inbox.put(("done", number, Outcome("complete", result=self._result(history, TrialResult))))
        except asyncio.CancelledError:
            pass
        finally:
            self._tasks.pop(number, None)

    def _result(self, history: list[dict[str, float]], result_type: Any) -> Any:
        """A trial's result as the harness measures one: objectives at the best epoch of the
        selection metric, eval-mode metrics of the kept epoch."""
        best = int(np.argmax([h[self.selection] for h in history]))  # the spec maximises val/acc
        kept = history[best]
        summary = {
            "train_acc": kept["train/acc"],
            "val_acc": kept["val/acc"],
            "test_acc": kept["val/acc"],
            "train_loss": kept["train/loss"],
            "val_loss": kept["val/loss"],
            "test_loss": kept["val/loss"],
            "gap": kept["train/acc"] - kept["val/acc"],
            "epochs": len(history),
            "epoch_time": self.seconds / len(history),
        }
        at_best = {**kept, "gap": summary["gap"], "epoch_time": summary["epoch_time"]}
        return result_type(
            values=[at_best[o.metric] for o in self.objectives], best_epoch=best, history=history, summary=summary
        )


# --- Stores -------------------------------------------------------------------------------------


@contextlib.contextmanager
def fresh_store(kind: str, folder: Path):
    """A study store URL of its own: a new SQLite file, or a new database on the PostgreSQL
    server of URL ``kind`` (dropped afterwards)."""
    if kind == "sqlite":
        yield f"sqlite:///{folder / f'{uuid.uuid4().hex[:8]}.db'}"
        return
    import sqlalchemy

    admin = sqlalchemy.create_engine(kind, isolation_level="AUTOCOMMIT")
    name = f"driver_scale_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    try:
        yield sqlalchemy.engine.make_url(kind).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(
                sqlalchemy.text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'")
            )
            conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


def store_label(kind: str) -> str:
    return "SQLite" if kind == "sqlite" else "PostgreSQL"


def engine_of(study: Any) -> Any:
    from hpo.running import internals

    storage = internals.storage_of(study)
    return getattr(storage, "_backend", storage).engine


def count_statements(engine: Any, measures: Measures) -> Any:
    import sqlalchemy

    def counted(conn, cursor, statement, parameters, context, executemany) -> None:
        verb = statement.lstrip()[:6].upper()
        if verb in ("INSERT", "UPDATE", "DELETE"):
            measures.writes += 1
        elif verb == "SELECT":
            measures.selects += 1

    sqlalchemy.event.listen(engine, "before_cursor_execute", counted)
    return lambda: sqlalchemy.event.remove(engine, "before_cursor_execute", counted)


# --- Memory -------------------------------------------------------------------------------------


def reset_peak_rss() -> None:
    """Start the peak-RSS count afresh (Linux: ``clear_refs`` 5 resets VmHWM)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mib() -> float:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- One row ------------------------------------------------------------------------------------


@dataclass
class Row:
    store: str
    tracking: bool
    concurrent: int
    finished: int
    pruned: int
    budget: int
    limited: bool
    wall: float
    utilisation: float
    trials_per_s: float
    measures: Measures
    driver_cpu: float
    process_cpu: float
    worker_cpu: float
    tracker_close: float | None
    peak_rss: float


def run_row(
    store: str,
    tracking: bool,
    concurrent: int,
    args: argparse.Namespace,
    curves: Curves,
    folder: Path,
    mlflow_uri: str,
) -> Row:
    import optuna

    import hpo.running.executor as executor
    from hpo.running.lease import driving
    from hpo.running.study import count_trials, create_study
    from hpo.spec import parse_spec

    text = SPACE.format(epochs=args.epochs, pruner=args.pruner)
    spec = parse_spec(text, source="driver_scale")
    budget = args.rounds * concurrent
    measures = Measures()
    with fresh_store(store, folder) as url:
        name = f"driver-scale-c{concurrent}-{'tracked' if tracking else 'untracked'}-{uuid.uuid4().hex[:6]}"
        handle = create_study(spec, text, name=name, storage=url, budget=budget, seed=0)
        engine = engine_of(handle.study)
        uncount = count_statements(engine, measures)
        timed = _Timed(measures)
        timed.wrap(executor, "_ask", measures.ask)
        timed.wrap(executor, "_tell", measures.tell)
        timed.wrap(executor, "best_trials", None)
        timed.wrap(executor._Tally, "catch_up", None)
        timed.wrap(optuna.Study, "get_trials", None)
        tracker = None
        if tracking:
            from hpo.tracking import Tracking
            from hpo.tracking.tracker import Tracker

            tracker = Tracker(handle, Tracking(enabled=True, uri=mlflow_uri, experiment=name), None, warn=print)
            tracker.start()
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.wait(0.25):
                if tracker is not None:
                    measures.backlog = max(measures.backlog, tracker._queue.qsize())

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        reset_peak_rss()
        begin = time.monotonic()
        backend = SimulatedBackend(
            concurrent,
            args.seconds,
            curves,
            spec.objective,
            spec.active_pruner.name != "none",
            measures,
            deadline=begin + args.limit,
        )
        cpu0, thread0 = time.process_time(), time.thread_time()
        try:
            with driving(url, name):
                summary = executor.run_study(handle, backend, listener=tracker, group_size=1)
        finally:
            timed.restore()
        at, driver_cpu, process_cpu, worker_cpu, measures.writes, measures.selects, measures.idle = (
            measures.cut or backend.counters()
        )
        wall, driver_cpu, process_cpu = at - begin, driver_cpu - thread0, process_cpu - cpu0
        backend.close()
        tracker_close = None
        if tracker is not None:
            start = time.perf_counter()
            tracker.close(summary.stopped)
            tracker_close = time.perf_counter() - start
        sampling.set()
        sampler.join()
        peak = peak_rss_mib()
        uncount()
        counts = count_trials(handle.study.get_trials(deepcopy=False))
        engine.dispose()
    limited = backend.stopped_at is not None
    starts = sorted(start for start, _ in measures.trials.values())
    end = backend.stopped_at if limited else (starts[-1] if len(starts) > 1 else begin + wall)
    window = max(end - begin, 1e-9)
    busy = sum(
        max(0.0, min(end if b is None else b, end) - max(a, begin))
        for _, spans in measures.trials.values()
        for a, b in spans
    )
    started = sum(1 for s in starts if s < end) if limited else len(starts)
    return Row(
        store_label(store),
        tracking,
        concurrent,
        counts.finished,
        counts.pruned,
        budget,
        limited,
        wall,
        busy / (concurrent * window),
        started / window,
        measures,
        driver_cpu,
        process_cpu,
        worker_cpu,
        tracker_close,
        peak,
    )


def row_line(row: Row) -> str:
    m = row.measures
    per_s = m.writes / row.wall, m.selects / row.wall
    busy = row.wall - m.idle
    report_total = sum(m.report)
    parts = [sum(m.ask), sum(m.tell), report_total, m.reads]
    parts.append(max(0.0, busy - sum(parts)))
    split = "/".join(f"{100 * p / row.wall:.0f}" for p in parts)
    tracker = "-" if row.tracker_close is None else f"{m.backlog} / {row.tracker_close:.1f} s"
    finished = f"{row.finished} / {row.budget}" + (" (limit)" if row.limited else "")
    return (
        f"| {row.store} | {'on' if row.tracking else 'off'} | {row.concurrent} | {finished} | {row.pruned} "
        f"| {row.wall:.1f} "
        f"| {100 * row.utilisation:.1f}% | {row.trials_per_s:.1f} | {ms(m.ask)} | {ms(m.tell)} | {ms(m.report)} "
        f"| {ms(m.round_trip)} | {len(m.round_trip) / row.wall:.0f} | {per_s[0]:.0f} / {per_s[1]:.0f} | {tracker} "
        f"| {100 * busy / row.wall:.0f}% ({split}) | {100 * row.driver_cpu / row.wall:.0f}% / "
        f"{100 * row.worker_cpu / row.wall:.0f}% / {100 * row.process_cpu / row.wall:.0f}% | {row.peak_rss:.0f} |"
    )


HEADER = (
    "| store | tracking | C | finished / budget | pruned | wall s | utilisation | trials/s | ask ms p50 / p95 "
    "| tell ms p50 / p95 | report ms p50 / p95 | round trip ms p50 / p95 | reports/s | writes/s / selects/s "
    "| tracker backlog / close | driver busy (ask/tell/reports/reads/rest %) | driver / trials / process CPU "
    "| peak RSS MiB |"
)


# --- Ask against the study's length ---------------------------------------------------------------


def ask_by_length(store: str, args: argparse.Namespace, curves: Curves, folder: Path) -> list[str]:
    import optuna

    import hpo.running.executor as executor
    from hpo.running.study import create_study
    from hpo.space import suggest
    from hpo.spec import parse_spec

    text = SPACE.format(epochs=args.epochs, pruner=args.pruner)
    spec = parse_spec(text, source="driver_scale")
    lines = []
    with fresh_store(store, folder) as url:
        handle = create_study(spec, text, name="driver-scale-length", storage=url, budget=10**9, seed=0)
        study, have = handle.study, 0
        drawing = optuna.create_study(directions=spec.directions, sampler=optuna.samplers.RandomSampler(seed=1))
        for length in sorted(args.lengths):
            configs, trials = [], []
            for _ in range(length - have):
                trial = drawing.ask()
                configs.append(suggest(trial, spec, seed=0))
                trials.append(trial)
            for trial, value in zip(trials, curves.final(configs) if configs else []):
                drawing.tell(trial, float(value))
            drawn = drawing.get_trials(deepcopy=False)
            study.add_trials(drawn[len(drawn) - len(trials) :])
            times = []
            for k in range(args.asks + 1):
                start = time.perf_counter()
                job = executor._ask(study, spec, 0)
                if k:
                    times.append(time.perf_counter() - start)
                study.tell(job.trial, float(curves.final([job.config])[0]))
            have = length + args.asks + 1
            p50 = percentile(times, 50)
            lines.append(
                f"| {store_label(store)} | {length:,} | {1000 * p50:.1f} | {1000 * percentile(times, 95):.1f} "
                f"| {1 / p50:.1f} | {args.seconds / p50:,.0f} |"
            )
        engine_of(study).dispose()
    return lines


# --- Main ---------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrent", type=int, nargs="+", default=[16, 64, 256, 1024], help="C, per row")
    parser.add_argument("--seconds", type=float, default=10.0, help="S: each trial's length when not pruned")
    parser.add_argument(
        "--epochs", type=int, default=20, help="E: epochs a trial reports (LCBench's 52 read at E evenly spaced)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="budget of a row: this many x C trials")
    parser.add_argument("--limit", type=float, default=90.0, help="seconds a row may run before it is stopped")
    parser.add_argument(
        "--storage", nargs="+", default=["sqlite"], help="'sqlite' (a new file per row) or PostgreSQL server URLs"
    )
    parser.add_argument(
        "--tracking", choices=["off", "on", "both"], help="MLflow tracking [default: both; --quick: off]"
    )
    parser.add_argument(
        "--pruner", choices=["median", "none"], default="median", help="the spec's pruner (none: no decisions asked)"
    )
    parser.add_argument("--lengths", type=int, nargs="*", default=[100, 1000, 5000, 10000], help="study lengths N")
    parser.add_argument("--asks", type=int, default=15, help="timed asks per study length")
    parser.add_argument("--task", default="189873", help="LCBench OpenML task whose surrogate gives the curves")
    parser.add_argument(
        "--quick", action="store_true", help="the CI size: 16 trials of 0.2 s, 5 epochs, 48 trials, no MLflow"
    )
    args = parser.parse_args()
    if args.quick:
        args.concurrent, args.seconds, args.epochs, args.rounds = [16], 0.2, 5, 3
        args.tracking, args.lengths, args.asks, args.limit = args.tracking or "off", [10, 30], 3, 60.0
    if not 1 <= args.epochs <= 52:
        parser.error("--epochs must be 1-52 (LCBench's curves have 52)")

    from hpo.output import configure

    configure(verbose_output=False)
    curves = Curves(args.task, args.epochs)
    trackings = {"off": [False], "on": [True], "both": [False, True]}[args.tracking or "both"]
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        mlflow_uri = f"sqlite:///{folder / 'mlflow.db'}"
        if True in trackings:  # MLflow's schema migrations once, before any row
            from hpo.tracking import Tracking
            from hpo.tracking.runs import client

            client(Tracking(uri=mlflow_uri)).search_experiments()
        for store in args.storage:
            for tracking in trackings:
                for concurrent in sorted(args.concurrent):
                    rows.append(run_row(store, tracking, concurrent, args, curves, folder, mlflow_uri))
                    print(f"  {row_line(rows[-1])}", file=sys.stderr, flush=True)
        lengths = [line for store in args.storage for line in ask_by_length(store, args, curves, folder)]

    print(
        f"{platform.machine()}, {len(os.sched_getaffinity(0))} usable CPUs; simulated trials of {args.seconds:g} s, "
        f"{args.epochs} epochs (LCBench task {args.task}), pruner {args.pruner}, budget {args.rounds} x C, "
        f"row limit {args.limit:g} s"
    )
    print()
    print(HEADER)
    print("|" + "---|" * HEADER.count(" | ") + "---|")
    for row in rows:
        print(row_line(row))
    if lengths:
        print()
        fed = f"trials of {args.seconds:g} s fed"
        print(f"| store | finished trials N | ask ms p50 | ask ms p95 | asks/s at p50 | {fed} |")
        print("|---|---|---|---|---|---|")
        for line in lengths:
            print(line)
    print()
    largest = [row for row in rows if row.concurrent == max(r.concurrent for r in rows)][-1]
    print(
        f"utilisation {100 * largest.utilisation:.1f}% at {largest.concurrent} concurrent trials of {args.seconds:g} s"
    )


if __name__ == "__main__":
    main()
