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
from hpo.models.sites import Site, block_pattern

#: Rate range each starter group searches.
RATE_RANGE = (0.0, 0.5)
#: Site names that say nothing alone: a group is named with the component before them too.
_GENERIC = ("dropout", "drop", "p")


def group_names(patterns: list[str]) -> list[str]:
    """A short, unique identifier per pattern, named for its sites: the last component that is not
    a block number (``blocks.*.attn.attn_drop`` → ``attn_drop``; a bare ``dropout`` with the
    component before it: ``blocks.*.dropout`` → ``blocks_dropout``), with as many components
    before it as tell it apart from the others (BERT's ``….attention.output.dropout`` and
    ``….layer.*.output.dropout`` → ``attention_output_dropout``, ``layer_output_dropout``)."""
    parts = [[p for p in pattern.split(".") if "*" not in p and "?" not in p] or ["sites"] for pattern in patterns]
    depth = [2 if len(p) > 1 and p[-1].lower() in _GENERIC else 1 for p in parts]

    def name(i: int) -> str:
        return re.sub(r"\W+", "_", "_".join(parts[i][-depth[i] :])).strip("_") or "sites"

    for _ in range(max(len(p) for p in parts) if parts else 0):
        names = [name(i) for i in range(len(patterns))]
        clash = [i for i, n in enumerate(names) if (names.count(n) > 1 or n[0].isdigit()) and depth[i] < len(parts[i])]
        if not clash:
            break
        for i in clash:
            depth[i] += 1
    taken: set[str] = set()
    unique = []
    for i in range(len(patterns)):
        base = name(i) if not name(i)[0].isdigit() else f"g_{name(i)}"
        chosen, k = base, 2
        while chosen in taken:
            chosen, k = f"{base}_{k}", k + 1
        taken.add(chosen)
        unique.append(chosen)
    return unique


@dataclass(frozen=True)
class StarterGroup:
    name: str
    pattern: str
    sites: tuple[Site, ...]


def starter_groups(sites: list[Site]) -> list[StarterGroup]:
    """One group per repeated block of sites a training step uses, in model order."""
    by_pattern: dict[str, list[Site]] = {}
    for site in sites:
        if site.acts:
            by_pattern.setdefault(block_pattern(site.path), []).append(site)
    names = group_names(list(by_pattern))
    return [
        StarterGroup(name, pattern, tuple(members))
        for name, (pattern, members) in zip(names, by_pattern.items(), strict=True)
    ]


def dropout_arguments(model: dict[str, Any]) -> list[str]:
    """Constructor arguments of the model (and of a nested config object) named for a drop
    probability (``drop_path_rate``, ``stochastic_depth_prob``, ``hidden_dropout_prob``), by
    their path under ``init_args`` (``config.init_args.hidden_dropout_prob``): a search through
    them keeps the model's own rules (timm's drop path rising with depth)."""
    import inspect

    from hpo.params import names_dropout
    from hpo.user_code import locate

    found = []
    nested = [
        (f"{k}.init_args.", v["class_path"])
        for k, v in (model.get("init_args") or {}).items()
        if isinstance(v, dict) and "class_path" in v
    ]
    targets = [("", model["class_path"]), *nested]
    for prefix, class_path in targets:
        try:
            parameters = inspect.signature(locate(class_path)).parameters
        except (HpoError, TypeError, ValueError):
            continue
        found += [
            f"{prefix}{name}"
            for name, p in parameters.items()
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and names_dropout(name)
        ]
    return found


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
    raise HpoError(
        f"the model logs no metric whose name says whether it is better high or low ({', '.join(logged)}): "
        "log a val_loss or val_acc, or write the objective yourself"
    )


@dataclass(frozen=True)
class Findings:
    """What ``hpo init`` found in the built model, beyond its groups: sites whose rate changes
    nothing (left out of every group), its Linear and Conv layers (for the max-norm hint) and
    its constructor arguments named for dropout."""

    idle: tuple[Site, ...] = ()
    layers: tuple[str, ...] = ()
    arguments: tuple[str, ...] = ()


def _max_norm_hint(layers: tuple[str, ...]) -> str:
    if not layers:
        return "  # max_norm: the model has no Linear or Conv layer it could hold"
    radius = "{choice: [null, 3.0]}"
    hint = f"  # max_norm: {{head: {{match: {json.dumps(layers[-1])}, radius: {radius}}}}}   # Linear/Conv layers"
    others = list(dict.fromkeys(block_pattern(p) for p in layers[:-1][-3:]))
    return hint + (f" by path, e.g. {', '.join(others)}" if others else "")


def render(
    model: dict[str, Any],
    data: dict[str, Any],
    groups: list[StarterGroup],
    objective: tuple[str, str],
    lightning: bool,
    name: str,
    findings: Findings = Findings(),
) -> str:
    """The starter spec's YAML, with comments saying what each group holds, what was left out
    and what else could be searched."""
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
    if findings.arguments:
        example = next((a for a in findings.arguments if "path" in a or "depth" in a), findings.arguments[0])
        lines += [
            f"  # arguments named for dropout: {', '.join(findings.arguments)}.",
            f"  # Searching one (e.g. {example}: {{low: 0.0, high: 0.3}}) keeps the model's own rule for its",
            "  # sites; a group over the same sites overrides it, so search one or the other.",
        ]
    lines.append("data: " + dump(data))
    lines += ["dropout:", "  groups:"]
    for group in groups:
        kinds = sorted({s.kind for s in group.sites})
        built = sorted({round(s.rate, 4) for s in group.sites})
        lines.append(
            f"    # {len(group.sites)} site{'s' if len(group.sites) > 1 else ''} ({', '.join(kinds)}), "
            f"built with rate {', '.join(f'{r:g}' for r in built)}"
        )
        lines.append(
            f"    {group.name}: {{match: {dump(group.pattern)}, rate: {{low: {RATE_RANGE[0]}, high: {RATE_RANGE[1]}}}}}"
        )
    for site in findings.idle:
        lines.append(f"    # not searched: {site.path} ({site.notes[0]})")
    lines += ["  unmatched: keep", _max_norm_hint(findings.layers)]
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


def init(
    model: str,
    out: Path,
    *,
    init_args: dict[str, Any] | None = None,
    data: str | None = None,
    data_args: dict[str, Any] | None = None,
    dataset: str = "digits",
    code_dir: Path | None = None,
    overwrite: bool = False,
    check: Callable[[Path], Any] | None = None,
    on_warning: Callable[[str], None] | None = None,
) -> tuple[str, list[StarterGroup]]:
    """Write a starter search space for ``model`` (an import path) at ``out`` and return its text
    and groups. ``data`` (an import path) or a built-in ``dataset`` gives the batch the sites are
    probed on. ``check`` (``hpo.api.prepare`` of the written file, its warnings to
    ``on_warning``) must pass, else the file is removed and the error raised."""
    from optuna.trial import FixedTrial

    from hpo.api import load_trial_data, prepare
    from hpo.models.groups import constrained_layers
    from hpo.running.user_check import build_checked
    from hpo.running.user_trial import example_batch
    from hpo.space import suggest
    from hpo.spec import parse_spec
    from hpo.user_code import add_code_dir

    if out.exists() and not overwrite:
        raise HpoError(f"{out} exists: choose another --out, or pass --force to overwrite it")
    folder = (code_dir or out.parent).resolve()
    model_spec = {"class_path": model, **({"init_args": init_args} if init_args else {})}
    data_spec: dict[str, Any] = (
        {"class_path": data, **({"init_args": data_args} if data_args else {})} if data else {"dataset": dataset}
    )
    name = re.sub(r"[^A-Za-z0-9_.\-]+", "-", model.rsplit(".", 1)[-1]).lower()
    draft = parse_spec(yaml.safe_dump({"name": name, "model": model_spec, "data": data_spec}), source="hpo init")
    add_code_dir(folder)
    loaded = load_trial_data(draft, str(folder))
    built = build_checked(suggest(FixedTrial({}), draft, seed=0), example_batch(loaded))
    if not built.table.sites:
        raise HpoError(
            f"{model} has no dropout site: no dropout module, no attention or recurrent dropout, no "
            "stochastic depth, and no dropout call in a training step"
        )
    groups = starter_groups(list(built.table.sites))
    idle = tuple(s for s in built.table.sites if not s.acts)
    if not groups:
        raise HpoError(
            f"{model} has no dropout site a training step uses: " + "; ".join(f"{s.path}: {s.notes[0]}" for s in idle)
        )
    findings = Findings(
        idle, tuple(path for path, _ in constrained_layers(built.network, ["**"])), tuple(dropout_arguments(model_spec))
    )
    objective = _choose_objective(_logged_metrics(draft, loaded)) if built.lightning else ("val/acc", "maximize")
    text = render(model_spec, data_spec, groups, objective, built.lightning, name, findings)
    if folder != out.parent.resolve():
        text = text.replace(
            f"name: {name}\n", f"name: {name}\ncode_dir: {os.path.relpath(folder, out.parent.resolve())}\n"
        )
    out.write_text(text)
    try:
        if check is None:
            warn = on_warning or (lambda line: None)
            prepare(parse_spec(out.read_text(), source=out), out, str(folder), on_note=lambda _: None, on_warning=warn)
        else:
            check(out)
    except Exception:
        out.unlink(missing_ok=True)
        raise
    return text, groups


def _logged_metrics(spec: Any, data: Any) -> list[str]:
    """What a LightningModule logs in one batch of training and validation."""
    from dataclasses import replace

    from optuna.trial import FixedTrial

    from hpo.running.trial import run_trial
    from hpo.space import suggest
    from hpo.spec import ObjectiveSpec

    config = suggest(FixedTrial({}), spec, seed=0)
    config = replace(config, train=replace(config.train, epochs=1))
    result = run_trial(config, data, [ObjectiveSpec(metric="epoch_time")], accelerator="cpu", batches=1)
    return sorted(k for k in result.history[-1] if k not in ("epoch", "epoch_time"))
