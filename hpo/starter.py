"""``hpo init``: a starter search space for the user's own model, written from the dropout sites
found in it, so a user starts from a file that runs.

Sites are grouped by repeated block: path components that only number a block (``layers.3``,
``encoder_layer_3``) become ``*``, and the sites that then share a pattern form one group with a
rate range of its own. The written file is checked as ``hpo submit`` would check it (the model
built at the centre of the space and trained on one batch) before this returns.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hpo.errors import HpoError
from hpo.models.sites import Site

#: Rate range each starter group searches.
RATE_RANGE = (0.0, 0.5)


def block_pattern(path: str) -> str:
    """``path`` with its block numbers as ``*``: ``encoder.layers.3.dropout1`` →
    ``encoder.layers.*.dropout1``, ``encoder.layers.encoder_layer_3.mlp.2`` →
    ``encoder.layers.encoder_layer_*.mlp.2`` (the last component is kept: it names the site)."""
    parts = path.split(".")
    head = [re.sub(r"^\d+$", "*", p) for p in parts[:-1]]
    head = [re.sub(r"_\d+$", "_*", p) for p in head]
    return ".".join([*head, parts[-1]])


def group_name(pattern: str, taken: set[str]) -> str:
    """A short name for a group: the components after its last ``*`` without a trailing
    ``dropout`` (``….attention.self.dropout`` → ``attention_self``), else the block's own name
    (``blocks.*.dropout`` → ``blocks``), as an identifier made unique against ``taken``."""
    parts = pattern.split(".")
    stars = [i for i, p in enumerate(parts) if "*" in p]
    if not stars:
        tail = parts
    else:
        tail = parts[stars[-1] + 1:]
        if len(tail) > 1 and "drop" in tail[-1].lower():
            tail = tail[:-1]
        if not tail or (len(tail) == 1 and "drop" in tail[0].lower()):
            tail = [parts[stars[-1] - 1]] if stars[-1] > 0 else ["sites"]
    base = re.sub(r"\W+", "_", "_".join(tail)).strip("_") or "sites"
    if base[0].isdigit():
        base = f"g_{base}"
    name, k = base, 2
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    taken.add(name)
    return name


@dataclass(frozen=True)
class StarterGroup:
    name: str
    pattern: str
    sites: tuple[Site, ...]


def starter_groups(sites: list[Site]) -> list[StarterGroup]:
    """One group per repeated block of sites, in model order."""
    by_pattern: dict[str, list[Site]] = {}
    for site in sites:
        by_pattern.setdefault(block_pattern(site.path), []).append(site)
    taken: set[str] = set()
    return [StarterGroup(group_name(pattern, taken), pattern, tuple(members)) for pattern, members in by_pattern.items()]


def _choose_objective(logged: list[str]) -> tuple[str, str]:
    """The objective for a LightningModule: a validation accuracy it logs, else a validation loss,
    else its first validation metric whose direction the name tells."""
    from hpo.spec import default_direction

    val = [m for m in logged if "val" in m.lower()] or logged
    for wanted in ("acc", "loss"):
        for name in val:
            if wanted in name.lower():
                return name, default_direction(name) or "maximize"
    for name in val:
        if default_direction(name):
            return name, default_direction(name)
    raise HpoError(f"the model logs no metric whose name says whether it is better high or low ({', '.join(logged)}): "
                   "log a val_loss or val_acc, or write the objective yourself")


def render(model: dict[str, Any], data: dict[str, Any], groups: list[StarterGroup], objective: tuple[str, str],
           lightning: bool, name: str) -> str:
    """The starter spec's YAML, with comments saying what each group holds."""
    dump = json.dumps  # JSON is YAML, on one line
    lines = [
        f"# Starter search space for {model['class_path']}, written by `hpo init` from the dropout sites found",
        "# in it (`hpo sites FILE` lists them). Each group searches one rate for its sites; widen, merge or",
        "# split the groups, add `variant: {choice: [inverted, gaussian]}` to a group of element-wise sites,",
        "# and search constructor arguments with ranges ({low: …, high: …}) or choices ({choice: […]}).",
        f"name: {name}",
        "model:",
        f"  class_path: {model['class_path']}",
    ]
    if model.get("init_args"):
        lines.append(f"  init_args: {dump(model['init_args'])}")
    lines.append("data: " + dump(data))
    lines += ["dropout:", "  groups:"]
    for group in groups:
        kinds = sorted({s.kind for s in group.sites})
        built = sorted({round(s.rate, 4) for s in group.sites})
        lines.append(f"    # {len(group.sites)} site{'s' if len(group.sites) > 1 else ''} ({', '.join(kinds)}), "
                     f"built with rate {', '.join(f'{r:g}' for r in built)}")
        lines.append(f"    {group.name}: {{match: {dump(group.pattern)}, rate: {{low: {RATE_RANGE[0]}, high: {RATE_RANGE[1]}}}}}")
    lines += [
        "  unmatched: keep",
        "  # max_norm: {head: {match: \"classifier\", radius: {choice: [null, 3.0]}}}   # Linear/Conv layers",
    ]
    if not lightning:
        lines.append("training: {optimizer: adam, lr: {low: 1.0e-4, high: 1.0e-2, log: true}, epochs: 10}")
    else:
        lines.append("training: {epochs: 10}")
    metric, direction = objective
    lines += [
        f"objective: {{metric: {dump(metric)}, direction: {direction}}}",
        "sampler: {name: tpe}",
        "pruner: {name: median, n_startup_trials: 5, n_warmup_steps: 3}",
        "budget: {trials: 20}",
    ]
    return "\n".join(lines) + "\n"


def init(model: str, out: Path, *, init_args: dict[str, Any] | None = None, data: str | None = None,
         data_args: dict[str, Any] | None = None, dataset: str = "digits", code_dir: Path | None = None,
         overwrite: bool = False, check: Callable[[Path], Any] | None = None) -> tuple[str, list[StarterGroup]]:
    """Write a starter search space for ``model`` (an import path) at ``out`` and return its text
    and groups. ``data`` (an import path) or a built-in ``dataset`` gives the batch the sites are
    probed on. ``check`` (``hpo.api.prepare`` of the written file) must pass, else the file is
    removed and the error raised."""
    from optuna.trial import FixedTrial

    from hpo.api import load_trial_data, prepare
    from hpo.running.user_check import build_checked
    from hpo.running.user_trial import example_batch
    from hpo.space import suggest
    from hpo.spec import parse_spec
    from hpo.user_code import add_code_dir

    if out.exists() and not overwrite:
        raise HpoError(f"{out} exists: choose another --out, or pass --force to overwrite it")
    folder = (code_dir or out.parent).resolve()
    model_spec = {"class_path": model, **({"init_args": init_args} if init_args else {})}
    data_spec: dict[str, Any] = ({"class_path": data, **({"init_args": data_args} if data_args else {})}
                                 if data else {"dataset": dataset})
    name = re.sub(r"[^A-Za-z0-9_.\-]+", "-", model.rsplit(".", 1)[-1]).lower()
    draft = parse_spec(yaml.safe_dump({"name": name, "model": model_spec, "data": data_spec}), source="hpo init")
    add_code_dir(folder)
    loaded = load_trial_data(draft, str(folder))
    built = build_checked(suggest(FixedTrial({}), draft, seed=0), example_batch(loaded))
    if not built.table.sites:
        raise HpoError(f"{model} has no dropout site: no dropout module, no attention or recurrent dropout, and no "
                       "dropout call in a training step")
    groups = starter_groups(list(built.table.sites))
    objective = _choose_objective(_logged_metrics(draft, loaded)) if built.lightning else ("val/acc", "maximize")
    text = render(model_spec, data_spec, groups, objective, built.lightning, name)
    if folder != out.parent.resolve():
        text = text.replace(f"name: {name}\n", f"name: {name}\ncode_dir: {os.path.relpath(folder, out.parent.resolve())}\n")
    out.write_text(text)
    try:
        (check or (lambda path: prepare(parse_spec(path.read_text(), source=path), path, str(folder))))(out)
    except Exception:
        out.unlink(missing_ok=True)
        raise
    return text, groups


def _logged_metrics(spec: Any, data: Any) -> list[str]:
    """What a LightningModule logs in one batch of training and validation."""
    from dataclasses import replace

    from optuna.trial import FixedTrial

    from hpo.running.user_trial import run_user_trial
    from hpo.space import suggest
    from hpo.spec import ObjectiveSpec

    config = suggest(FixedTrial({}), spec, seed=0)
    config = replace(config, train=replace(config.train, epochs=1))
    result = run_user_trial(config, data, [ObjectiveSpec(metric="epoch_time")], accelerator="cpu", batches=1)
    return sorted(k for k in result.history[-1] if k not in ("epoch", "epoch_time"))
