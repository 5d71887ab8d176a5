"""Dropout groups: patterns over site paths, each group one searched rate (and variant), and
max-norm on the layers a pattern names.

Patterns are globs over dotted paths: ``*`` matches one path component (or part of one:
``dropout*``), ``**`` any number of components, and a pattern must match the whole path:
``encoder.layers.*.self_attn`` matches ``encoder.layers.3.self_attn`` and nothing below it. A
site belongs to the first group whose pattern matches it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from torch import nn

from hpo.models.dropout import variant_layer
from hpo.models.schedules import CONSTANT, Schedule
from hpo.models.sites import Site, SiteTable, set_rate

#: Layers max-norm constrains: each output unit's incoming weights are a row (Linear) or a
#: filter (Conv).
CONSTRAINABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _component(text: str) -> str:
    return "".join("[^.]*" if c == "*" else "[^.]" if c == "?" else re.escape(c) for c in text)


@lru_cache(maxsize=256)
def _regex(pattern: str) -> re.Pattern[str]:
    parts = pattern.split(".")
    if parts == ["**"]:
        return re.compile(r".*")
    text = ""
    for i, part in enumerate(parts):
        if part == "**":
            text += r"(?:[^.]+\.)*" if i == 0 else r"(?:\.[^.]+)*"
        else:
            text += (r"\." if i > 0 and not (i == 1 and parts[0] == "**") else "") + _component(part)
    return re.compile(text)


def matches(pattern: str, path: str) -> bool:
    """Whether glob ``pattern`` matches the whole dotted ``path``."""
    return _regex(pattern).fullmatch(path) is not None


def first_match(patterns: Sequence[str], path: str) -> bool:
    return any(matches(p, path) for p in patterns)


@dataclass(frozen=True)
class Group:
    """One group of sites searched together: a name, its patterns, the rate every member gets
    (the peak of its ``schedule``) and, for element-wise members, the variant (``None`` keeps
    each site's own layer)."""

    name: str
    patterns: tuple[str, ...]
    rate: float
    variant: str | None = None
    schedule: Schedule = CONSTANT


@dataclass(frozen=True)
class SiteSetting:
    """What a trial does at one site: its group (``None`` when unmatched), rate (the peak of
    ``schedule``) and variant."""

    site: Site
    group: str | None
    rate: float
    variant: str | None
    schedule: Schedule = CONSTANT

    def to_dict(self) -> dict[str, object]:
        return {
            "path": self.site.path,
            "kind": self.site.kind,
            "group": self.group,
            "rate": self.rate,
            "variant": self.variant,
            "built_rate": self.site.rate,
            "schedule": self.schedule.describe(),
        }


def assign(sites: Iterable[Site], patterns: dict[str, Sequence[str]]) -> dict[str, str | None]:
    """Site path → the first group whose patterns match it (``None``: unmatched)."""
    return {
        site.path: next((name for name, pats in patterns.items() if first_match(pats, site.path)), None)
        for site in sites
    }


def resolve(table: SiteTable, groups: Sequence[Group], unmatched: str = "keep") -> list[SiteSetting]:
    """The setting of every site: a matched site takes its group's rate (and variant, when it
    takes one); an unmatched site keeps its rate (``keep``) or gets 0 (``zero``). ``refuse`` is
    checked before a study starts (:func:`unmatched_sites`)."""
    owners = assign(table.sites, {g.name: g.patterns for g in groups})
    by_name = {g.name: g for g in groups}
    settings = []
    for site in table.sites:
        group = by_name.get(owners[site.path] or "")
        if group is None:
            settings.append(SiteSetting(site, None, 0.0 if unmatched == "zero" else site.rate, None))
        else:
            variant = group.variant if site.takes_variant and group.variant not in (None, "keep") else None
            settings.append(SiteSetting(site, group.name, group.rate, variant, group.schedule))
    return settings


def apply(model: nn.Module, settings: Iterable[SiteSetting]) -> None:
    """Set every site's rate, and swap element-wise dropout modules for the chosen variant's
    layer (``inverted``: ``nn.Dropout``) in their parent."""
    for s in settings:
        if s.variant is None:
            set_rate(model, s.site, s.rate)
            continue
        parent, _, name = s.site.module.rpartition(".")
        setattr(model.get_submodule(parent), name, variant_layer(s.variant, s.rate))


def idle_groups(groups: Sequence[Group], settings: Sequence[SiteSetting]) -> list[tuple[Group, list[Site]]]:
    """Groups whose rate reaches no site a training step uses, each with the sites it matched
    (none, or only sites whose rate changes nothing): a rate searched there would be stored
    and never applied."""
    idle = []
    for group in groups:
        members = [s.site for s in settings if s.group == group.name]
        if not any(site.acts for site in members):
            idle.append((group, members))
    return idle


def unmatched_sites(table: SiteTable, patterns: dict[str, Sequence[str]]) -> list[Site]:
    owners = assign(table.sites, patterns)
    return [s for s in table.sites if owners[s.path] is None]


def constrained_layers(model: nn.Module, patterns: Sequence[str]) -> list[tuple[str, nn.Module]]:
    """The Linear and Conv layers whose module path a pattern matches, in module order."""
    return [
        (path, m) for path, m in model.named_modules() if isinstance(m, CONSTRAINABLE) and first_match(patterns, path)
    ]
