"""How many torch threads in-process trials train with.

torch's default, one thread per core, suits large models on an idle machine. The networks a
dropout study trains are mostly small: their steps are too short to split, each extra thread
adds synchronisation, and when anything else wants the CPU (another study, the tracker thread, a
browser) torch's spinning threads collapse (issue 17 measured a digits epoch going from 0.05 s to
1.6 s). So the executor counts the FLOP of one training step of the study's model (torch's
``FlopCounterMode``: deterministic, so a seeded study always gets the same count and computes the
same numbers) and gives it one thread per :data:`MIN_FLOPS_PER_THREAD`, at least one and at most
the usable cores. ``--cpus-per-trial`` overrides the rule. ``bench/threads.py`` measures where a
second thread starts to pay on a given machine.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

#: FLOP per training step each thread must have before another one is added. Measured with
#: ``bench/threads.py`` on the 2-core x86-64 VM (docs/performance.md): below about this size,
#: one thread was as fast as two or faster.
MIN_FLOPS_PER_THREAD = 2.0e8


def usable_cores() -> int:
    """CPUs this process may run on (its affinity, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


def rnn_forward_flops(rnn: nn.RNNBase, x: torch.Tensor) -> float:
    """FLOP of ``rnn``'s forward pass over ``x``: per step, layer and direction, each gate's two
    matrix products (input and recurrent state) at 2 FLOP per multiply-add, and an LSTM's
    projection."""
    steps, batch = (x.shape[1], x.shape[0]) if rnn.batch_first else (x.shape[0], x.shape[1] if x.ndim > 2 else 1)
    directions = 2 if rnn.bidirectional else 1
    out = getattr(rnn, "proj_size", 0) or rnn.hidden_size
    total = 0.0
    for layer in range(rnn.num_layers):
        inputs = rnn.input_size if layer == 0 else out * directions
        total += 2 * _GATES.get(rnn.mode, 1) * rnn.hidden_size * (inputs + out)
        if getattr(rnn, "proj_size", 0):
            total += 2 * rnn.hidden_size * rnn.proj_size
    return float(total * directions * steps * batch)


def step_flops(model: nn.Module, loss_of: Callable[[nn.Module], torch.Tensor]) -> float:
    """FLOP of one training step's forward and backward pass (``loss_of(model)`` gives the
    loss). torch's counter sees no FLOP in a fused RNN kernel (the CPU LSTM's): such a module
    counts 3 times its forward (:func:`rnn_forward_flops`), the backward pass being about twice
    the forward. Gradients are cleared afterwards and the global random generator is left as it
    was."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    unseen: list[float] = []
    before: dict[int, float] = {}

    def enter(module: nn.Module, args: tuple) -> None:
        before[id(module)] = counter.get_total_flops()

    def leave(module: nn.Module, args: tuple, _out: Any) -> None:
        if counter.get_total_flops() == before.pop(id(module)) and isinstance(args[0], torch.Tensor):
            unseen.append(3 * rnn_forward_flops(module, args[0]))

    rnns = [m for m in model.modules() if isinstance(m, nn.RNNBase)]
    handles = [h for m in rnns for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    try:
        with torch.random.fork_rng(devices=[]), counter:
            loss_of(model).backward()
    finally:
        for handle in handles:
            handle.remove()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops()) + sum(unseen)


def choose_threads(flops: float, cores: int) -> int:
    """One thread per :data:`MIN_FLOPS_PER_THREAD` of a step, between 1 and ``cores``."""
    return max(1, min(cores, int(flops // MIN_FLOPS_PER_THREAD)))


@dataclass(frozen=True)
class ThreadChoice:
    """The thread count of in-process trials and why."""

    threads: int
    flops: float | None = None
    cores: int = 1
    #: Members of a vectorised group: ``flops`` is the whole group's step.
    group_size: int = 1

    def describe(self) -> str:
        if self.flops is None:
            return (
                f"in-process trials train with {self.threads} torch thread{'s' * (self.threads > 1)} (--cpus-per-trial)"
            )
        step = "training step" if self.group_size == 1 else f"training step of a group of {self.group_size}"
        return (
            f"in-process trials train with {self.threads} torch thread{'s' * (self.threads > 1)} of {self.cores} "
            f"cores ({self.flops / 1e6:,.0f} MFLOP per {step}; one thread per "
            f"{MIN_FLOPS_PER_THREAD / 1e6:,.0f} MFLOP; --cpus-per-trial to choose)"
        )


def centre_step_flops(spec: Any, data: Any, group_size: int = 1) -> float:
    """FLOP of one training step of the study's model at the centre of its space, on a batch of
    the spec's batch size (a vectorised group of ``group_size`` members does that many)."""
    from hpo.running.trial import kind_of
    from hpo.space import centre_config

    config = centre_config(spec)
    with torch.random.fork_rng(devices=[]):
        step = kind_of(config).training_step(config, data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a LightningModule's self.log outside a trainer
            flops = step_flops(step.network, step.loss)
    return group_size * flops * step.scale


def thread_choice(spec: Any, data: Any, cpus_per_trial: float | None, group_size: int = 1) -> ThreadChoice:
    """In-process trials' thread count: ``cpus_per_trial`` when given, else the FLOP rule."""
    cores = usable_cores()
    if cpus_per_trial is not None:
        return ThreadChoice(max(1, int(cpus_per_trial)), cores=cores)
    try:
        flops = centre_step_flops(spec, data, group_size)
    except Exception:
        return ThreadChoice(torch.get_num_threads(), cores=cores)
    return ThreadChoice(choose_threads(flops, cores), flops, cores, group_size)


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's intra-op thread count while the block runs, restored after (the driver's process
    outlives a study when it is a notebook)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
