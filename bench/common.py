"""What the bench scripts share: a study whose every trial does the same amount of work, and a
free loopback port. Imported by the scripts beside it (``python bench/<script>.py``)."""

from __future__ import annotations

import socket

_SPACE = """
name: bench
data: {{dataset: digits, seed: 0}}
model: {{arch: mlp, layers: 2, units: {units}}}
dropout:
  variant: inverted
  input: {{low: 0.0, high: 0.3}}
  hidden: {{low: 0.0, high: 0.6}}
  max_norm: {{choice: [null, 3.0]}}
training: {{lr: {{low: 0.01, high: 0.2, log: true}}, epochs: {epochs}, batch_size: {batch_size}}}
sampler: {{name: tpe, seed: 0}}
pruner: {{name: none}}
baselines: []
"""


def fixed_work_space(*, units: int, batch_size: int, epochs: int) -> str:
    """A digits MLP search space (2 x ``units``) with fixed width, epochs and batch size, no
    pruning and no early stopping: only dropout rates, max-norm and lr vary."""
    return _SPACE.format(units=units, batch_size=batch_size, epochs=epochs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
