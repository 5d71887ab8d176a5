"""Monte-Carlo dropout (Gal & Ghahramani, 2016): keep dropout on at inference, average the
softmax of several stochastic passes, and compare accuracy, negative log-likelihood and
calibration with the deterministic (eval-mode) network.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from hpo.data import Split
from hpo.models.module import logits_of
from hpo.models.sites import probe, walk

#: Bins of the expected calibration error.
ECE_BINS = 15
_BATCH = 4096


#: Modules whose eval-mode fast path skips their dropout children (PyTorch runs a fused kernel
#: when the layer is in eval mode): MC dropout must switch them to training mode too.
_FAST_PATHS = (nn.TransformerEncoderLayer, nn.TransformerEncoder, nn.TransformerDecoderLayer, nn.TransformerDecoder)


def dropout_modules(net: nn.Module, x: torch.Tensor | None = None) -> list[nn.Module]:
    """The modules of ``net`` that hold a dropout site with a rate above 0
    (:mod:`hpo.models.sites`): dropout layers, attention and recurrent modules, and, when ``x``
    (a few inputs) lets the probe run a forward, the modules that pass a rate to functional
    dropout (Hugging Face attention)."""
    table = walk(net) if x is None else probe(net, lambda m: m(x))
    owners = {s.module for s in table.sites if s.rate > 0 and (x is not None or s.kind != "functional")}
    return [m for path, m in net.named_modules() if path in owners]


def enable_mc_dropout(net: nn.Module, x: torch.Tensor | None = None) -> int:
    """Eval mode everywhere except the modules holding dropout sites, which keep sampling masks
    (each switched alone, not its children), and the transformer layers around them, whose
    eval-mode fast path would skip their dropout. Returns how many dropout modules there are
    (0: MC dropout equals the deterministic network)."""
    net.eval()
    modules = dropout_modules(net, x)
    for module in modules:
        module.training = True
    inside = {id(m) for m in modules}
    for layer in net.modules():
        if isinstance(layer, _FAST_PATHS) and any(id(m) in inside for m in layer.modules()):
            layer.training = True
    return len(modules)


@torch.inference_mode()
def probabilities(net: nn.Module, x: torch.Tensor, samples: int = 0, seed: int = 0) -> torch.Tensor:
    """Class probabilities of ``x`` per pass, shape ``(passes, N, classes)``: one deterministic
    pass (``samples == 0``) or ``samples`` Monte-Carlo dropout passes (seeded), to be averaged
    by the caller."""
    device = next(net.parameters()).device
    if samples:
        enable_mc_dropout(net, x[:8].to(device))
        torch.manual_seed(seed)
    else:
        net.eval()
    passes = []
    for _ in range(max(samples, 1)):
        chunks = [F.softmax(logits_of(net(x[i:i + _BATCH].to(device))), dim=-1).cpu() for i in range(0, len(x), _BATCH)]
        passes.append(torch.cat(chunks))
    net.eval()
    return torch.stack(passes)


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
    deterministic: Scores
    mc: Scores
    samples: int
    dropout_modules: int


def compare(net: nn.Module, split: Split, samples: int = 50, seed: int = 0) -> Comparison:
    """Deterministic vs ``samples``-pass MC-dropout scores of ``net`` on ``split``."""
    count = len(dropout_modules(net, split.x[:8].to(next(net.parameters()).device)))
    deterministic = probabilities(net, split.x)[0]
    mc = probabilities(net, split.x, samples, seed).mean(dim=0)
    return Comparison(score(deterministic, split.y), score(mc, split.y), samples, count)
