"""Dropout sites: every place in a built model where a rate decides how much is dropped.

A module walk finds the sites that are modules or module attributes: ``nn.Dropout*``,
``AlphaDropout``, ``FeatureAlphaDropout``, DropBlock and hpo's own variant layers (their ``p``),
``nn.MultiheadAttention`` (its ``dropout`` float), stacked ``nn.LSTM``/``nn.GRU``/``nn.RNN``
(their ``dropout`` float between layers) and float attributes whose name says dropout
(``dropout_prob``, ``attn_drop``…), which a module may pass to functional dropout or to
``scaled_dot_product_attention(dropout_p=…)``.

A walk cannot see what a forward does with them, so :func:`probe` runs one training step on a
copy of the model with every site set to its own *sentinel* rate, under a torch function mode
that records each dropout call (``F.dropout`` and its kin, ``scaled_dot_product_attention``,
``multi_head_attention_forward``, the fused RNN kernels) and the module that made it. A recorded
rate names its site exactly, so the probe tells which sites drop as modules, which only lend
their rate to a functional call (Hugging Face's attention keeps an ``nn.Dropout`` it never calls
and passes its ``p`` to SDPA), which do nothing, and which dropout calls no site accounts for.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from hpo.models.dropout import DropConnectLinear, GaussianDropout, LockedDropout, StandardDropout

#: What a site is, which decides what a search may change there:
#: ``element-wise`` (a dropout module called as a module: rate and variant), ``channel`` (whole
#: channels or blocks: rate), ``attention`` (``nn.MultiheadAttention.dropout``), ``recurrent``
#: (between stacked RNN layers, or hpo's recurrent-state dropout), ``weights`` (DropConnect) and
#: ``functional`` (a rate read by the forward and passed to a functional call).
SiteKind = Literal["element-wise", "channel", "attention", "recurrent", "weights", "functional"]

_ELEMENT_WISE = (nn.Dropout, nn.AlphaDropout, StandardDropout, GaussianDropout)
_CHANNEL = (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.FeatureAlphaDropout, LockedDropout)
_CHANNEL_NAMES = ("DropBlock2d", "DropBlock3d")
_RATE_WORDS = ("drop",)


@dataclass(frozen=True)
class Site:
    """One dropout site of a built model.

    Args:
        path: Where it is, as patterns see it: the module path (``encoder.layers.0.dropout1``),
            with ``.attribute`` appended for a float attribute of a module
            (``blocks.0.attn.attn_drop``); ``""`` is the model itself.
        kind: See :data:`SiteKind`.
        module: Path of the module that holds the rate.
        attribute: Name of the attribute holding the rate (``p``, ``dropout``, …).
        rate: The drop probability as built.
        module_type: Class name of the module holding the rate.
        notes: What a user should be warned of (one RNN layer, never used, …).
        used_by: For a ``functional`` site, the call its rate reaches and the module making it
            (``scaled_dot_product_attention in encoder.layer.0.attention.self``).
    """

    path: str
    kind: SiteKind
    module: str
    attribute: str
    rate: float
    module_type: str
    notes: tuple[str, ...] = ()
    used_by: str = ""

    @property
    def takes_variant(self) -> bool:
        """Whether another dropout variant can replace this site (an element-wise module that
        the forward calls as a module)."""
        return self.kind == "element-wise"


@dataclass(frozen=True)
class UnaccountedCall:
    """A dropout call in the probed training step whose rate no site holds: it cannot be
    searched after construction."""

    module: str
    function: str
    rate: float


@dataclass(frozen=True)
class SiteTable:
    """The sites of a model, and what the probe saw that no site explains."""

    sites: tuple[Site, ...]
    unaccounted: tuple[UnaccountedCall, ...] = ()
    identities: tuple[str, ...] = ()
    probed: bool = False
    probe_error: str = ""

    def warnings(self) -> list[str]:
        """One line per thing a user should know before searching this model."""
        lines = [f"{s.path}: {note}" for s in self.sites for note in s.notes]
        lines += [f"{c.module or '(model)'}: {c.function}(p={c.rate:g}) is functional dropout that no site holds; "
                  "it keeps its rate (search the init argument that sets it)" for c in self.unaccounted]
        lines += [f"{path}: nn.Identity where dropout would be (a rate-0 site built away); search the init "
                  "argument that sets it, with a range above 0 at construction" for path in self.identities]
        if self.probe_error:
            lines.append(f"the probe could not run a training step ({self.probe_error}); functional dropout "
                         "is not checked")
        return lines


def _walk_site(path: str, module: nn.Module) -> list[Site]:
    """The sites that ``module`` itself holds (not its children)."""
    kind_name = type(module).__name__
    if isinstance(module, _ELEMENT_WISE):
        return [Site(path, "element-wise", path, "p", float(module.p), kind_name)]
    if isinstance(module, _CHANNEL) or kind_name in _CHANNEL_NAMES:
        return [Site(path, "channel", path, "p", float(module.p), kind_name)]
    if isinstance(module, DropConnectLinear):
        return [Site(path, "weights", path, "p", float(module.p), kind_name)]
    if isinstance(module, nn.MultiheadAttention):
        return [Site(path, "attention", path, "dropout", float(module.dropout), kind_name)]
    if isinstance(module, nn.RNNBase):
        notes = ()
        if module.num_layers == 1:
            notes = (f"{kind_name} dropout acts between stacked layers only, and this one has 1 layer: "
                     "its rate changes nothing",)
        return [Site(path, "recurrent", path, "dropout", float(module.dropout), kind_name, notes)]
    if kind_name == "DropoutLSTMLayer":
        return [Site(path, "recurrent", path, "p", float(module.p), kind_name)]
    sites = []
    for name, value in vars(module).items():
        if (not name.startswith("_") and type(value) is float and 0.0 <= value < 1.0
                and any(word in name.lower() for word in _RATE_WORDS)):
            sites.append(Site(f"{path}.{name}" if path else name, "functional", path, name, value, kind_name))
    return sites


def walk(model: nn.Module) -> SiteTable:
    """The sites a module walk finds, in module order. Float attributes are candidates only
    (:func:`probe` keeps those a training step really uses)."""
    sites: list[Site] = []
    identities: list[str] = []
    for path, module in model.named_modules():
        sites += _walk_site(path, module)
        leaf = path.rsplit(".", 1)[-1]
        if type(module) is nn.Identity and any(word in leaf.lower() for word in _RATE_WORDS):
            identities.append(path)
    return SiteTable(tuple(sites), identities=tuple(identities))


def _set_rate(model: nn.Module, site: Site, rate: float) -> None:
    setattr(model.get_submodule(site.module), site.attribute, rate)


def set_rate(model: nn.Module, site: Site, rate: float) -> None:
    """Give ``site`` of ``model`` the drop probability ``rate``."""
    _set_rate(model, site, float(rate))


#: Functional calls that drop, with the position and keyword of their rate.
_RATE_ARGUMENT: dict[str, tuple[int, str]] = {
    "dropout": (1, "p"), "dropout1d": (1, "p"), "dropout2d": (1, "p"), "dropout3d": (1, "p"),
    "alpha_dropout": (1, "p"), "feature_alpha_dropout": (1, "p"), "feature_dropout": (1, "p"),
    "scaled_dot_product_attention": (4, "dropout_p"), "multi_head_attention_forward": (10, "dropout_p"),
}
_RNN_KERNELS = ("lstm", "gru", "rnn_tanh", "rnn_relu")


def _recorded_rate(name: str, args: tuple, kwargs: dict[str, Any]) -> float | None:
    """The drop probability a dropout call was given, or ``None`` when it will not drop
    (``training=False``) or the call is not dropout."""
    if name in _RNN_KERNELS:
        floats = [i for i, a in enumerate(args) if type(a) is float]
        if not floats:
            return None
        train = next((a for a in args[floats[0] + 1:] if type(a) is bool), True)
        return float(args[floats[0]]) if train else None
    if name not in _RATE_ARGUMENT:
        return None
    index, keyword = _RATE_ARGUMENT[name]
    rate = kwargs.get(keyword, args[index] if len(args) > index else None)
    if name == "multi_head_attention_forward":
        training = kwargs.get("training", True)
    elif name == "scaled_dot_product_attention":
        training = True
    else:
        training = kwargs.get("training", args[2] if len(args) > 2 else True)
    if rate is None or not training or isinstance(rate, torch.Tensor):
        return None
    return float(rate)


class _Recorder(TorchFunctionMode):
    """Records ``(innermost module path, function name, rate)`` of every dropout call."""

    def __init__(self, stack: list[str]) -> None:
        super().__init__()
        self.stack = stack
        self.calls: list[tuple[str, str, float]] = []

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        rate = _recorded_rate(name, args, kwargs)
        if rate is not None:
            self.calls.append((self.stack[-1] if self.stack else "", name, rate))
        return func(*args, **kwargs)


@contextlib.contextmanager
def _module_stack(model: nn.Module) -> Iterator[tuple[list[str], set[str]]]:
    """The path of the module running now (a stack kept by forward hooks) and every module path
    whose forward ran."""
    stack: list[str] = []
    ran: set[str] = set()
    handles = []
    for path, module in model.named_modules():
        def enter(_m: nn.Module, _args: Any, path: str = path) -> None:
            stack.append(path)
            ran.add(path)

        def leave(_m: nn.Module, _args: Any, _out: Any, path: str = path) -> None:
            if stack and stack[-1] == path:
                stack.pop()

        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave, always_call=True))
    try:
        yield stack, ran
    finally:
        for handle in handles:
            handle.remove()


def dropout_calls(model: nn.Module, step: Callable[[nn.Module], Any]) -> list[tuple[str, str, float]]:
    """``(module path, function, rate)`` of every dropout call one training step of ``model``
    makes (``step`` gets the model, put in training mode and restored after; the global random
    generator is restored too): what the model really drops at, site by site."""
    was_training = model.training
    model.train()
    try:
        with _module_stack(model) as (stack, _), torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            recorder = _Recorder(stack)
            with recorder:
                step(model)
    finally:
        model.train(was_training)
    return recorder.calls


def _sentinel(k: int) -> float:
    """A rate no model would choose, distinct for each site: 0.4713..., 0.4714..., …"""
    return 0.471_3 + 0.000_1 * k + 0.000_000_37


def probe(model: nn.Module, step: Callable[[nn.Module], Any], table: SiteTable | None = None) -> SiteTable:
    """Run ``step`` (one training step on one batch, given a copy of ``model``) with every site
    at its own sentinel rate, and return the sites a training step really uses, classified.

    The copy keeps ``model`` untouched (its weights, metrics and rates); the global random
    generator is restored afterwards, so seeded training is not shifted. A module site whose
    module never runs but whose rate reaches a functional call becomes ``functional`` (no variant
    can replace it); a float-attribute candidate that no call uses is dropped; a module site
    that neither runs nor lends its rate is kept with a note. If ``step`` raises, the walk's
    table is returned with the error.
    """
    table = table or walk(model)
    twin = copy.deepcopy(model)
    sentinels = {}
    for k, site in enumerate(table.sites):
        sentinels[k] = _sentinel(k)
        _set_rate(twin, site, sentinels[k])
    twin.train()
    with _module_stack(twin) as (stack, ran), torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        recorder = _Recorder(stack)
        try:
            with recorder:
                step(twin)
        except Exception as exc:  # noqa: BLE001 - reported, the walk still stands
            candidates = tuple(s for s in table.sites if s.kind != "functional")
            return replace(table, sites=candidates, probe_error=f"{type(exc).__name__}: {exc}".splitlines()[0])
    used: dict[int, list[tuple[str, str]]] = {}
    unaccounted = []
    for caller, function, rate in recorder.calls:
        k = next((k for k, s in sentinels.items() if abs(s - rate) < 1e-9), None)
        if k is None:
            if rate > 0:
                unaccounted.append(UnaccountedCall(caller, function, rate))
        else:
            used.setdefault(k, []).append((caller, function))
    sites = []
    for k, site in enumerate(table.sites):
        calls = used.get(k, [])
        if site.kind == "functional":
            if calls:
                sites.append(_lent(site, calls))
            continue
        called = site.module in ran
        if site.kind == "element-wise" and not called and calls:
            sites.append(_lent(replace(site, kind="functional"), calls))
        elif not called and not calls:
            sites.append(replace(site, notes=site.notes + ("never used in a training step: its rate changes nothing",)))
        else:
            sites.append(site)
    seen = {(c.module, c.function, c.rate) for c in unaccounted}
    return SiteTable(tuple(sites), tuple(UnaccountedCall(*key) for key in sorted(seen)), table.identities, True)


def _lent(site: Site, calls: list[tuple[str, str]]) -> Site:
    caller, function = calls[0]
    return replace(site, used_by=f"{function} in {caller or '(model)'}")
