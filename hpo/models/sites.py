"""Dropout sites: every place in a built model where a rate decides how much is dropped.

A module walk finds the sites that are modules or module attributes: ``nn.Dropout*``,
``AlphaDropout``, ``FeatureAlphaDropout``, DropBlock and hpo's own variant layers (their ``p``),
stochastic depth (timm's ``DropPath``, torchvision's ``StochasticDepth``),
``nn.MultiheadAttention`` (its ``dropout`` float), stacked ``nn.LSTM``/``nn.GRU``/``nn.RNN``
(their ``dropout`` float between layers), float attributes whose name says dropout
(``dropout_prob``, ``attn_drop``, ``layerdrop``…), which a module may pass to functional dropout,
to ``scaled_dot_product_attention(dropout_p=…)``, to a drop-path mask or to a layer-skipping
draw, and the float attributes of a module whose class is named for dropout (a user's own
``DropPath(p)``).

A walk cannot see what a forward does with them, so :func:`probe` runs one training step on a
copy of the model with every site set to its own *sentinel* rate, under a torch function mode
that records every torch call given a sentinel (``F.dropout`` and its kin,
``scaled_dot_product_attention``, ``multi_head_attention_forward``, the fused RNN kernels, a
``bernoulli_`` mask drawn with the keep probability ``1 - rate``, a comparison of a random draw
with a layer-drop rate) and the module that made it. A recorded sentinel names its site exactly,
so the probe tells which sites drop as modules, which only lend their rate to a call made
elsewhere (Hugging Face's and timm's attention keep an ``nn.Dropout`` they never call and pass
its ``p`` to SDPA), which do nothing, and which dropout calls no site accounts for.

The probe is deterministic: the copy's random generators are seeded and the caller's restored,
and layer-drop rates are probed at sentinels so small that no layer is skipped, so the same model
gives the same table whatever the trial's seed.
"""

from __future__ import annotations

import contextlib
import copy
import random
import re
import warnings
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from hpo.models.dropout import DropConnectLinear, GaussianDropout, LockedDropout, StandardDropout

#: What a site is, which decides what a search may change there:
#: ``element-wise`` (a dropout module called as a module: rate and variant), ``channel`` (whole
#: channels or blocks: rate), ``attention`` (``nn.MultiheadAttention.dropout``), ``recurrent``
#: (between stacked RNN layers, or hpo's recurrent-state dropout), ``weights`` (DropConnect),
#: ``functional`` (a rate read by the forward and passed to a functional call), ``path``
#: (stochastic depth: a residual branch dropped per example) and ``layer`` (layer drop: whole
#: layers skipped at random, Hugging Face's ``layerdrop``).
SiteKind = Literal["element-wise", "channel", "attention", "recurrent", "weights", "functional", "path", "layer"]

_ELEMENT_WISE = (nn.Dropout, nn.AlphaDropout, StandardDropout, GaussianDropout)
_CHANNEL = (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.FeatureAlphaDropout, LockedDropout)
_CHANNEL_NAMES = ("DropBlock2d", "DropBlock3d")
#: Stochastic-depth modules by class name, with the attribute holding their drop probability.
_PATH_MODULES = {"DropPath": "drop_prob", "StochasticDepth": "p"}
_RATE_WORDS = ("drop", "stochastic_depth")
_LAYER_WORDS = ("layerdrop", "layer_drop")
_DROPOUT_CLASS = re.compile(r"drop|stochasticdepth", re.IGNORECASE)
_COMPARISONS = {"__lt__", "__le__", "__gt__", "__ge__", "lt", "le", "gt", "ge", "less", "greater"}
_MASKS = {"bernoulli", "bernoulli_"}


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
        used_by: For a rate lent to a call made elsewhere, the call and the module making it
            (``scaled_dot_product_attention in encoder.layer.0.attention.self``).
        callers: Paths of the modules whose forward made the calls that read this rate: the
            modules whose training flag decides whether it drops (MC dropout switches them on).
    """

    path: str
    kind: SiteKind
    module: str
    attribute: str
    rate: float
    module_type: str
    notes: tuple[str, ...] = ()
    used_by: str = ""
    callers: tuple[str, ...] = ()

    @property
    def takes_variant(self) -> bool:
        """Whether another dropout variant can replace this site (an element-wise module that
        the forward calls as a module)."""
        return self.kind == "element-wise"

    @property
    def acts(self) -> bool:
        """Whether a training step uses this site's rate: every note a site gets says it does
        not (one stacked RNN layer, never used)."""
        return not self.notes


@dataclass(frozen=True)
class UnaccountedCall:
    """A dropout call in the probed training step whose rate no site holds: it cannot be
    searched after construction."""

    module: str
    function: str
    rate: float


@dataclass(frozen=True)
class SiteTable:
    """The sites of a model, and what the probe saw that no site explains.

    Args:
        unseen_layer_drops: Layer-drop rates above 0 (``(path, rate)``) that no torch call of a
            training step read: a model that draws the skip with NumPy or Python's ``random``.
            They keep their rate.
    """

    sites: tuple[Site, ...]
    unaccounted: tuple[UnaccountedCall, ...] = ()
    identities: tuple[str, ...] = ()
    probed: bool = False
    probe_error: str = ""
    unseen_layer_drops: tuple[tuple[str, float], ...] = ()

    def warnings(self, searched_calls: Collection[str] = ()) -> list[str]:
        """One line per thing a user should know before searching this model; functional dropout
        of the modules in ``searched_calls`` is set by a searched constructor argument, and
        gets none."""
        lines = [f"{s.path}: {note}" for s in self.sites for note in s.notes]
        lines += [
            f"{c.module or '(model)'}: {c.function}(p={c.rate:g}) is functional dropout that no site holds; "
            "it keeps its rate (search the init argument that sets it)"
            for c in self.unaccounted
            if c.module not in searched_calls
        ]
        lines += [
            f"{path}: layer drop {rate:g} that no torch call of a training step reads (drawn outside torch?): "
            "it is not a site and keeps its rate"
            for path, rate in self.unseen_layer_drops
        ]
        lines += identity_warnings(self)
        if self.probe_error:
            lines.append(
                f"the probe could not run a training step ({self.probe_error}); functional dropout, "
                "stochastic depth and layer drop are not checked"
            )
        return lines


def block_pattern(path: str) -> str:
    """``path`` with its block numbers as ``*``: ``encoder.layers.3.dropout1`` →
    ``encoder.layers.*.dropout1``, ``encoder.layers.encoder_layer_3.mlp.2`` →
    ``encoder.layers.encoder_layer_*.mlp.2`` (the last component is kept: it names the site)."""
    parts = path.split(".")
    head = [re.sub(r"^\d+$", "*", p) for p in parts[:-1]]
    head = [re.sub(r"_\d+$", "_*", p) for p in head]
    return ".".join([*head, parts[-1]])


def identity_warnings(table: SiteTable) -> list[str]:
    """One line per block pattern of ``nn.Identity`` modules named for dropout. Where the same
    pattern holds real sites (timm builds block 0's drop path as ``nn.Identity`` because its
    depth rule gives it rate 0), the identities are the model's design and get no line."""
    live = {block_pattern(s.module) for s in table.sites}
    by_pattern: dict[str, list[str]] = {}
    for path in table.identities:
        if block_pattern(path) not in live:
            by_pattern.setdefault(block_pattern(path), []).append(path)
    lines = []
    for pattern, paths in by_pattern.items():
        where = paths[0] if len(paths) == 1 else f"{pattern} ({len(paths)} modules)"
        lines.append(
            f"{where}: nn.Identity where dropout would be (a rate-0 site built away); search the init "
            "argument that sets it, with a range above 0 at construction"
        )
    return lines


def _rate_like(module: nn.Module) -> Iterator[tuple[str, float]]:
    """``module``'s public float attributes in [0, 1): what could be a drop probability."""
    for name, value in vars(module).items():
        if not name.startswith("_") and type(value) is float and 0.0 <= value < 1.0:
            yield name, value


def _float_candidates(path: str, module: nn.Module, kind_name: str) -> list[Site]:
    """Float attributes of ``module`` that may be a rate: named for dropout, or any float in
    [0, 1) of a module whose class is named for dropout (a user's ``DropPath(p)``)."""
    named_class = bool(_DROPOUT_CLASS.search(kind_name))
    sites = []
    for name, value in _rate_like(module):
        lowered = name.lower()
        if named_class or any(word in lowered for word in _RATE_WORDS):
            kind: SiteKind = "layer" if any(word in lowered for word in _LAYER_WORDS) else "functional"
            sites.append(Site(f"{path}.{name}" if path else name, kind, path, name, value, kind_name))
    return sites


def _walk_site(path: str, module: nn.Module) -> list[Site]:
    """The sites that ``module`` itself holds (not its children)."""
    kind_name = type(module).__name__
    if isinstance(module, _ELEMENT_WISE):
        return [Site(path, "element-wise", path, "p", float(module.p), kind_name)]
    if isinstance(module, _CHANNEL) or kind_name in _CHANNEL_NAMES:
        return [Site(path, "channel", path, "p", float(module.p), kind_name)]
    if isinstance(module, DropConnectLinear):
        return [Site(path, "weights", path, "p", float(module.p), kind_name)]
    if kind_name in _PATH_MODULES and isinstance(getattr(module, _PATH_MODULES[kind_name], None), (int, float)):
        attribute = _PATH_MODULES[kind_name]
        return [Site(path, "path", path, attribute, float(getattr(module, attribute)), kind_name)]
    if isinstance(module, nn.MultiheadAttention):
        return [Site(path, "attention", path, "dropout", float(module.dropout), kind_name)]
    if isinstance(module, nn.RNNBase):
        notes = ()
        if module.num_layers == 1:
            notes = (
                f"{kind_name} dropout acts between stacked layers only, and this one has 1 layer: "
                "its rate changes nothing",
            )
        return [Site(path, "recurrent", path, "dropout", float(module.dropout), kind_name, notes)]
    if kind_name == "DropoutLSTMLayer":
        return [Site(path, "recurrent", path, "p", float(module.p), kind_name)]
    return _float_candidates(path, module, kind_name)


def _unnamed_candidates(model: nn.Module, named: tuple[Site, ...]) -> tuple[Site, ...]:
    """Float attributes in [0, 1) of modules from outside ``torch`` that no name marks as a rate
    (a user's ``SkipBranch(p)``): sites only where a dropout call or a mask reads them."""
    taken = {(s.module, s.attribute) for s in named}
    found = []
    for path, module in model.named_modules():
        if type(module).__module__.startswith("torch."):
            continue
        for name, value in _rate_like(module):
            if (path, name) not in taken:
                where = f"{path}.{name}" if path else name
                found.append(Site(where, "functional", path, name, value, type(module).__name__))
    return tuple(found)


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


def set_rate(model: nn.Module, site: Site, rate: float) -> None:
    """Give ``site`` of ``model`` the drop probability ``rate``."""
    setattr(model.get_submodule(site.module), site.attribute, float(rate))


#: Functional calls that drop, with the position and keyword of their rate.
_RATE_ARGUMENT: dict[str, tuple[int, str]] = {
    "dropout": (1, "p"),
    "dropout1d": (1, "p"),
    "dropout2d": (1, "p"),
    "dropout3d": (1, "p"),
    "alpha_dropout": (1, "p"),
    "feature_alpha_dropout": (1, "p"),
    "feature_dropout": (1, "p"),
    "scaled_dot_product_attention": (4, "dropout_p"),
    "multi_head_attention_forward": (10, "dropout_p"),
}
_RNN_KERNELS = ("lstm", "gru", "rnn_tanh", "rnn_relu")


def _recorded_rate(name: str, args: tuple, kwargs: dict[str, Any]) -> float | None:
    """The drop probability a dropout call was given, or ``None`` when it will not drop
    (``training=False``) or the call is not dropout."""
    if name in _RNN_KERNELS:
        floats = [i for i, a in enumerate(args) if type(a) is float]
        if not floats:
            return None
        train = next((a for a in args[floats[0] + 1 :] if type(a) is bool), True)
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


@dataclass(frozen=True)
class Call:
    """A torch call of a traced step that read a rate.

    Args:
        module: Path of the innermost module running when the call was made.
        function: The torch function's name.
        rate: The drop probability it was given (``1 - keep`` for a mask drawn with the keep
            probability).
        per_example: For a mask, whether it drops whole examples (shape ``(N, 1, …, 1)``): a
            drop path.
    """

    module: str
    function: str
    rate: float
    per_example: bool = False


def _mask_is_per_example(tensor: Any) -> bool:
    shape = tuple(getattr(tensor, "shape", ()))
    return len(shape) > 1 and all(side == 1 for side in shape[1:])


class _Recorder(TorchFunctionMode):
    """Records every dropout call and every call given one of ``rates`` (or its keep
    probability ``1 - rate``): what a traced step reads its rates with, and where."""

    def __init__(self, stack: list[str], rates: frozenset[float] = frozenset()) -> None:
        super().__init__()
        self.stack = stack
        self.rates = rates
        self.keeps = {1.0 - r: r for r in rates}
        self.calls: list[Call] = []

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        where = self.stack[-1] if self.stack else ""
        rate = _recorded_rate(name, args, kwargs)
        if rate is not None:
            self.calls.append(Call(where, name, rate))
        elif self.rates and name not in _RATE_ARGUMENT and name not in _RNN_KERNELS:
            for value in (*args, *kwargs.values()):
                if type(value) is not float:
                    continue
                if name in _MASKS and (value in self.keeps or value in self.rates):
                    rate = self.keeps.get(value, value)
                    self.calls.append(Call(where, name, rate, _mask_is_per_example(args[0])))
                elif value in self.rates:
                    self.calls.append(Call(where, name, value))
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


@contextlib.contextmanager
def seeded(model: nn.Module, seed: int = 0) -> Iterator[None]:
    """Run with torch's (CPU and the model's CUDA devices'), NumPy's and Python's random
    generators seeded with ``seed``, and restore the caller's afterwards: a traced step is the
    same every time and shifts no seeded training."""
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed)
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def trace(
    model: nn.Module, step: Callable[[nn.Module], Any], rates: frozenset[float] = frozenset(), *, train: bool = True
) -> tuple[list[Call], set[str]]:
    """The calls one step of ``model`` makes that read a rate (every dropout call, and every call
    given one of ``rates`` or its keep probability), and the paths of the modules that ran.
    ``train`` puts the model in training mode for the step (restored after); ``False`` keeps
    each module's own mode (MC dropout's). Random generators are seeded and restored
    (:func:`seeded`); warnings from the step are silenced."""
    was_training = [(m, m.training) for m in model.modules()]
    if train:
        model.train()
    try:
        with _module_stack(model) as (stack, ran), seeded(model), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            recorder = _Recorder(stack, rates)
            with recorder:
                step(model)
    finally:
        for module, mode in was_training:
            module.training = mode
    return recorder.calls, ran


def dropout_calls(model: nn.Module, step: Callable[[nn.Module], Any]) -> list[tuple[str, str, float]]:
    """``(module path, function, rate)`` of every dropout call one training step of ``model``
    makes (``step`` gets the model, put in training mode and restored after; the random
    generators are restored too): what the model really drops at, site by site."""
    calls, _ = trace(model, step)
    return [(c.module, c.function, c.rate) for c in calls]


def _sentinel(k: int, kind: SiteKind) -> float:
    """A rate no model would choose, distinct for each site: 0.4713..., 0.4714..., …; for a
    layer drop a rate so small that the probed step skips no layer (1e-9, 2e-9, …)."""
    if kind == "layer":
        return 1e-9 * (k + 1) + 3.7e-15
    return 0.471_3 + 0.000_1 * k + 0.000_000_37


def sentinel_twin(model: nn.Module, sites: tuple[Site, ...]) -> tuple[nn.Module, dict[float, int]]:
    """A copy of ``model`` with every site at its own sentinel rate, and sentinel → site index."""
    twin = copy.deepcopy(model)
    sentinels = {}
    for k, site in enumerate(sites):
        sentinels[_sentinel(k, site.kind)] = k
        set_rate(twin, site, _sentinel(k, site.kind))
    return twin, sentinels


def probe(model: nn.Module, step: Callable[[nn.Module], Any], table: SiteTable | None = None) -> SiteTable:
    """Run ``step`` (one training step on one batch, given a copy of ``model``) with every site
    at its own sentinel rate, and return the sites a training step really uses, classified.

    The copy keeps ``model`` untouched (its weights, metrics and rates); the step runs seeded,
    with the caller's random generators restored afterwards, so seeded training is not shifted
    and the table is the same for every seed. A module site whose module never runs but whose
    rate reaches a functional call becomes ``functional`` (no variant can replace it); a float
    candidate read by a per-example mask becomes ``path``; a float-attribute candidate that no
    call uses is dropped; a module site that neither runs nor lends its rate is kept with a
    note. Float attributes of modules from outside ``torch`` that no name marks as rates are
    probed too, and become sites where a dropout call or a mask reads them. If ``step`` raises,
    the walk's module sites are returned with the error.
    """
    table = table or walk(model)
    unnamed = _unnamed_candidates(model, table.sites)
    candidates = table.sites + unnamed
    twin, sentinels = sentinel_twin(model, candidates)
    try:
        calls, ran = trace(twin, step, frozenset(sentinels))
    except Exception as exc:
        kept = tuple(s for s in table.sites if s.kind not in ("functional", "layer"))
        return replace(table, sites=kept, probe_error=f"{type(exc).__name__}: {exc}".splitlines()[0])
    used: dict[int, list[Call]] = {}
    unaccounted = []
    for call in calls:
        k = sentinels.get(call.rate)
        if k is None:
            if call.rate > 0:
                unaccounted.append(UnaccountedCall(call.module, call.function, call.rate))
        elif k < len(table.sites) or _drops(call):
            used.setdefault(k, []).append(call)
    sites, unseen = [], []
    for k, site in enumerate(candidates):
        calls_k = used.get(k, [])
        if site.kind in ("functional", "layer") and not calls_k:
            if site.kind == "layer" and site.rate > 0:
                unseen.append((site.path, site.rate))
            continue
        sites.append(_classified(site, calls_k, site.module in ran))
    seen = {(c.module, c.function, c.rate) for c in unaccounted}
    return SiteTable(
        tuple(sites),
        tuple(UnaccountedCall(*key) for key in sorted(seen)),
        table.identities,
        True,
        unseen_layer_drops=tuple(unseen),
    )


def _drops(call: Call) -> bool:
    """Whether ``call`` drops with its rate: a dropout function, an RNN kernel or a mask."""
    return call.function in _RATE_ARGUMENT or call.function in _RNN_KERNELS or call.function in _MASKS


def _classified(site: Site, calls: list[Call], called: bool) -> Site:
    """``site`` as the probe saw it used: its kind settled, its callers and what it lends to."""
    site = replace(site, callers=tuple(dict.fromkeys(c.module for c in calls)))
    lent = f"{calls[0].function} in {calls[0].module or '(model)'}" if calls else ""
    if site.kind == "functional":
        if any(c.per_example for c in calls):
            return replace(site, kind="path", used_by=lent)
        if all(c.function in _COMPARISONS for c in calls):
            return replace(site, kind="layer", used_by=lent)
        return replace(site, used_by=lent)
    if site.kind == "layer":
        return replace(site, used_by=lent)
    if site.kind == "element-wise" and not called and calls:
        return replace(site, kind="functional", used_by=lent)
    if not called and not calls:
        return replace(site, notes=site.notes + ("never used in a training step: its rate changes nothing",))
    return site
