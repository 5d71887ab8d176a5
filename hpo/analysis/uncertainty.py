"""Monte-Carlo dropout (Gal & Ghahramani, 2016): keep dropout on at inference, average the
softmax of several stochastic passes, and compare accuracy, negative log-likelihood and
calibration with the deterministic (eval-mode) network.

Which modules must stay in training mode comes from the dropout-site probe
(:mod:`hpo.models.sites`): the modules holding each site's rate *and* the modules whose forward
reads it (Hugging Face's and timm's attention keep an ``nn.Dropout`` they never call and pass
its rate to SDPA only while the attention module itself is training). A traced pass in MC mode
then shows which sites really sample, and which cannot.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from hpo.models.module import inputs_to, logits_of
from hpo.models.sites import Site, probe, sentinel_twin, trace

#: Bins of the expected calibration error.
ECE_BINS = 15
_BATCH = 4096
#: Examples the probe and the MC check run on.
_PROBE_EXAMPLES = 8

#: Modules whose eval-mode fast path skips their dropout children (PyTorch runs a fused kernel
#: when the layer is in eval mode): MC dropout must switch them to training mode too.
_FAST_PATHS = (nn.TransformerEncoderLayer, nn.TransformerEncoder, nn.TransformerDecoderLayer, nn.TransformerDecoder)

Inputs = tuple[tuple[Any, ...], dict[str, Any]]


@dataclass(frozen=True)
class EvalSet:
    """Test examples as the model takes them, batch by batch (positional and keyword inputs:
    a tensor, or a Hugging Face mapping), and their labels."""

    batches: list[Inputs]
    y: torch.Tensor

    @classmethod
    def of_tensor(cls, x: torch.Tensor, y: torch.Tensor, batch: int = _BATCH) -> EvalSet:
        return cls([((x[i : i + batch],), {}) for i in range(0, len(x), batch)], y)

    def __len__(self) -> int:
        return len(self.y)

    def head(self, n: int = _PROBE_EXAMPLES) -> Inputs:
        """The first ``n`` examples of the first batch: the probe's input."""
        args, kwargs = self.batches[0]
        cut = lambda v: v[:n] if isinstance(v, torch.Tensor) else v  # noqa: E731
        return tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}


def _step(inputs: Inputs) -> Callable[[nn.Module], Any]:
    args, kwargs = inputs
    return lambda model: model(*args, **kwargs)


@dataclass(frozen=True)
class MCSwitch:
    """What MC dropout switched on.

    Args:
        modules: Modules put in training mode (those holding a site and those reading its rate).
        sampled: Paths of the sites with a rate above 0 that a traced MC pass drew masks at.
        unsampled: Sites with a rate above 0 that it did not (a rate read outside torch, a
            fused kernel no flag reaches), each with why.
    """

    modules: int
    sampled: tuple[str, ...]
    unsampled: tuple[str, ...]


def _live_sites(net: nn.Module, inputs: Inputs) -> list[Site]:
    return [s for s in probe(net, _step(inputs)).sites if s.rate > 0 and s.acts]


def enable_mc_dropout(net: nn.Module, inputs: Inputs) -> MCSwitch:
    """Eval mode everywhere except the modules that hold a dropout site with a rate above 0 or
    read its rate (each switched alone, not its children), and the transformer layers around
    them, whose eval-mode fast path would skip their dropout. ``inputs`` (a few examples, on the
    network's device) let the probe find the sites and check which ones sample."""
    sites = _live_sites(net, inputs)
    net.eval()
    owners = {path for s in sites for path in (s.module, *s.callers)}
    modules = [m for path, m in net.named_modules() if path in owners]
    for module in modules:
        module.training = True
    inside = {id(m) for m in modules}
    for layer in net.modules():
        if isinstance(layer, _FAST_PATHS) and any(id(m) in inside for m in layer.modules()):
            layer.training = True
    return MCSwitch(len(modules), *_sampling(net, sites, inputs))


def _sampling(net: nn.Module, sites: list[Site], inputs: Inputs) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Which of ``sites`` a pass of ``net`` in its present modes draws masks at."""
    if not sites:
        return (), ()
    twin, sentinels = sentinel_twin(net, tuple(sites))
    with torch.inference_mode():
        calls, _ = trace(twin, _step(inputs), frozenset(sentinels), train=False)
    hit = {sentinels[c.rate] for c in calls if c.rate in sentinels}
    sampled = tuple(s.path for k, s in enumerate(sites) if k in hit)
    unsampled = tuple(
        f"{s.path} ({s.kind}, rate {s.rate:g}): no traced MC pass read its rate"
        for k, s in enumerate(sites)
        if k not in hit
    )
    return sampled, unsampled


def _as_eval_set(data: torch.Tensor | EvalSet) -> EvalSet:
    if isinstance(data, EvalSet):
        return data
    return EvalSet.of_tensor(data, torch.zeros(len(data), dtype=torch.long))


def probabilities(net: nn.Module, data: torch.Tensor | EvalSet, samples: int = 0, seed: int = 0) -> torch.Tensor:
    """Class probabilities per pass, shape ``(passes, N, classes)``: one deterministic pass
    (``samples == 0``) or ``samples`` Monte-Carlo dropout passes (seeded), to be averaged by the
    caller. ``data`` is an input tensor or an :class:`EvalSet`."""
    data = _as_eval_set(data)
    if not samples:
        net.eval()
        return _passes(net, data, 1)
    enable_mc_dropout(net, inputs_to(next(net.parameters()).device, *data.head()))
    torch.manual_seed(seed)
    return _passes(net, data, samples)


@torch.inference_mode()
def _passes(net: nn.Module, data: EvalSet, passes: int) -> torch.Tensor:
    """``passes`` forward passes of ``net`` over ``data`` in its present modes, as softmax
    probabilities; ``net`` is left in eval mode."""
    device = next(net.parameters()).device
    stacked = []
    for _ in range(passes):
        chunks = []
        for inputs in data.batches:
            args, kwargs = inputs_to(device, *inputs)
            chunks.append(F.softmax(logits_of(net(*args, **kwargs)), dim=-1).cpu())
        stacked.append(torch.cat(chunks))
    net.eval()
    return torch.stack(stacked)


def expected_calibration_error(probs: torch.Tensor, y: torch.Tensor, bins: int = ECE_BINS) -> float:
    """Mean |accuracy - confidence| over equal-width confidence bins, weighted by bin size."""
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == y).float()
    edges = torch.linspace(0, 1, bins + 1)
    ece = 0.0
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            ece += inside.float().mean().item() * abs(correct[inside].mean().item() - confidence[inside].mean().item())
    return ece


@dataclass(frozen=True)
class Scores:
    """Accuracy, mean negative log-likelihood (nats) and expected calibration error."""

    accuracy: float
    nll: float
    ece: float


def score(probs: torch.Tensor, y: torch.Tensor) -> Scores:
    nll = F.nll_loss(torch.log(probs.clamp_min(1e-12)), y).item()
    return Scores(float((probs.argmax(1) == y).float().mean()), nll, expected_calibration_error(probs, y))


@dataclass(frozen=True)
class Comparison:
    """Deterministic against MC-dropout scores, and what MC dropout switched on
    (:class:`MCSwitch`)."""

    deterministic: Scores
    mc: Scores
    samples: int
    switch: MCSwitch

    @property
    def dropout_modules(self) -> int:
        return self.switch.modules


def compare(net: nn.Module, data: EvalSet | Any, samples: int = 50, seed: int = 0) -> Comparison:
    """Deterministic vs ``samples``-pass MC-dropout scores of ``net`` on ``data`` (an
    :class:`EvalSet`, or a split with ``x`` and ``y`` tensors)."""
    if not isinstance(data, EvalSet):
        data = EvalSet.of_tensor(data.x, data.y)
    deterministic = probabilities(net, data)[0]
    switch = enable_mc_dropout(net, inputs_to(next(net.parameters()).device, *data.head()))
    torch.manual_seed(seed)
    mc = _passes(net, data, samples).mean(dim=0)
    return Comparison(score(deterministic, data.y), score(mc, data.y), samples, switch)
