r"""The worst case: a gradient search on the condition for an exploding inverse.

Random OOD inputs show an exploding inverse only by luck. The attack searches for it:
from each given condition :math:`y_0` (its K latents :math:`z_k` drawn at τ exactly as the
scan draws them, :class:`~flowaudit.config.sampling.Sampling`) it runs projected gradient ascent

.. math:: y_{t+1} = \Pi\big(y_t + \alpha_t\, u(\nabla_y J(y_t))\big),\qquad
          J(y) = \frac1K \sum_k j\big(f^{-1}(z_k; y)\big)

inside a :class:`~flowaudit.config.budget.Budget` (:math:`\Pi` its projection, then the valid range
for image conditions; :math:`u` the step direction, below). Per sample the objective :math:`j` is one of

* ``logdet`` — the inverse log-determinant :math:`\sum_{\text{sites}}\sum_i \log(1/c'_i)`;
* ``max-gain`` — the largest log inverse gain :math:`\max_{\text{sites}, i} \log(1/c'_i)`;
* ``max-abs`` — :math:`\log \max_i |x_i|` of the sample.

The step direction :math:`u` is per coordinate normalised, so one step moves about α in every
coordinate whatever the gradient's size (the gradient of :math:`1/s` spans decades where the
inverse starts to blow up, and saturated scales give gradients near 0): ``sign`` (PGD,
:math:`u = \operatorname{sign} g`) or ``adam`` (default, :class:`AdamDirection`,
:math:`u = \hat m / \sqrt{\hat v}`), whose momentum carries a start across flat stretches where
``sign`` stalls. For :math:`L_2` the direction is rescaled to unit norm. Default step
:math:`\alpha = 2.5\,r/N` for a budget of radius :math:`r` and :math:`N` steps; with ``none``,
:math:`\alpha_t = \alpha_0 \rho^t` from 1 % of the conditions' spread, ρ such that N steps travel
100 spreads.

A start is **broken** once a sample leaves ``adapter.error_band`` or goes non-finite;
``distance_to_break`` is how far from :math:`y_0` that first happened. A start is reported at its
best breaking point, else at the best point its path visited; a start that went non-finite stops
there, and non-finite gradients are zeroed. Its ``layer`` is the first layer of the inverse pass
whose max |value| went non-finite, or grew ×10 over the start's and past 10× the error band.
Every step is per start, so a start's path depends only on its own condition and latents.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..adapters import Adapter
from ..config.budget import Budget
from ..config.sampling import Sampling
from ..config.settings import OBJECTIVES, RULES, Search
from ..errors import AuditError

__all__ = ["OBJECTIVES", "RULES", "DetachedGains", "Search", "GainKeeper", "AdamDirection", "search", "default_step"]

ADAM_BETAS = (0.9, 0.999)


class DetachedGains(AuditError):
    """The adapter passes detached inverse gains: gain objectives cannot be differentiated (``max-abs`` may)."""


def default_step(budget: Budget, steps: int, spread: float) -> tuple[float, float]:
    """``(α₀, ρ)``: the first step and its growth per step (1 unless the budget is ``none``)."""
    n = max(steps, 1)
    if budget.kind != "none":
        return 2.5 * budget.radius / n, 1.0
    first, reach = 0.01 * spread, 100.0 * spread
    lo, hi = 1.0, 2.0  # ρ with sum_{t<n} ρ^t = reach / first, by bisection
    for _ in range(60):
        mid = (lo + hi) / 2
        if mid == 1:
            total = float(n)
        else:  # ρ^n overflows a float for n in the thousands: such a sum is past any reach anyway
            total = (mid**n - 1) / (mid - 1) if n * math.log(mid) < 700 else math.inf
        lo, hi = (mid, hi) if total < reach / first else (lo, mid)
    return first, hi


def _row_max_abs(x: Tensor) -> Tensor:
    """max |v| per row, float64, NaN counted as inf."""
    a = x.detach().flatten(1).abs().to(torch.float64)
    return torch.where(torch.isnan(a), torch.full_like(a, math.inf), a).amax(1)


def _row_max_gain(gain: Tensor) -> Tensor:
    """Largest inverse gain per row, float64; a NaN gain (a site fed values that were already
    non-finite) is left out, so a blow-up is charged to the site that made it, not to every site after."""
    a = gain.detach().flatten(1).to(torch.float64)
    return torch.where(torch.isnan(a), torch.zeros_like(a), a).amax(1)


class GainKeeper:
    """The attack's observer: keeps the gains attached (``keep_graph``) and sums them per row.

    ``logdet`` and ``max_log`` are (rows,) tensors in the graph; with ``record`` it also keeps,
    detached, each site's largest gain and each layer's largest |value| per row, and per site the largest
    |value| and the non-finite count of the layer output it feeds (the first layer reported after it).
    """

    keep_graph = True

    def __init__(self, record: bool = False):
        self.record = record
        self.logdet: Tensor | None = None
        self.max_log: Tensor | None = None
        self.attached = False
        self.site_max: dict[str, Tensor] = {}
        self.layer_max: dict[str, Tensor] = {}
        self.site_abs: dict[str, Tensor] = {}
        self.site_nonfinite: dict[str, Tensor] = {}
        self._waiting: list[str] = []  # sites reported since the last layer: their output is the next layer

    def layer(self, name: str, x: Tensor) -> None:
        if self.record:
            top = self.layer_max[name] = _row_max_abs(x)
            bad = (~torch.isfinite(x.detach().flatten(1))).sum(1)
            for s in self._waiting:
                self.site_abs[s] = top if s not in self.site_abs else torch.maximum(self.site_abs[s], top)
                self.site_nonfinite[s] = bad + self.site_nonfinite.get(s, 0)
            self._waiting = []

    def site(self, name: str, gain: Tensor, params: object) -> None:
        # a gain of exactly 1 everywhere (an additive site) has a zero derivative, attached or not
        self.attached = self.attached or gain.requires_grad or bool((gain.detach() == 1).all())
        lg = torch.log(gain.flatten(1).to(torch.float64))
        total, top = lg.sum(1), lg.amax(1)
        self.logdet = total if self.logdet is None else self.logdet + total
        self.max_log = top if self.max_log is None else torch.maximum(self.max_log, top)
        if self.record:
            g = _row_max_gain(gain)
            self.site_max[name] = g if name not in self.site_max else torch.maximum(self.site_max[name], g)
            self._waiting.append(name)


_UNDIFFERENTIABLE = "the {} adapter cannot differentiate its samples w.r.t. the condition, so it cannot be attacked"


def _objective(adapter: Adapter, keeper: GainKeeper, x: Tensor, name: str, check: bool = True) -> Tensor:
    """The per-row objective ``j`` (see module docstring), checked to be differentiable when ``check``."""
    if name == "max-abs":
        if check and not x.requires_grad:
            raise AuditError(_UNDIFFERENTIABLE.format(adapter.family))
        a = x.flatten(1).abs().to(torch.float64).amax(1)
        return torch.log(a)
    value = keeper.logdet if name == "logdet" else keeper.max_log
    if value is None:
        raise AuditError(
            f"{adapter.name}: no site reported an inverse gain, so --objective {name} has nothing to maximise "
            "(use max-abs)"
        )
    if check and not keeper.attached:
        raise DetachedGains(
            f"the {adapter.family} adapter passes detached inverse gains, so --objective {name} cannot be "
            "differentiated w.r.t. the condition (use --objective max-abs)"
        )
    return value


def _broken(x: Tensor, band: tuple[float, float]) -> Tensor:
    """Per row: a value outside the error band or non-finite."""
    v = x.detach().flatten(1)
    return (~torch.isfinite(v)).any(1) | (v < band[0]).any(1) | (v > band[1]).any(1)


def _pass(adapter: Adapter, y: Tensor, latents: list[Tensor], sampling: Sampling, objective: str, record: bool):
    """One inverse pass at conditions ``y``: ``(x, J per start, broken per start, dead per start, keeper)``."""
    keeper = GainKeeper(record)
    x = adapter.sample(sampling.repeat(y), latents, observer=keeper)
    if record:
        keeper.layer_max["output"] = _row_max_abs(x)
    j = sampling.per_input(_objective(adapter, keeper, x, objective, check=torch.is_grad_enabled())).mean(1)
    dead = sampling.per_input((~torch.isfinite(x.detach().flatten(1))).any(1)).any(1) | ~torch.isfinite(j.detach())
    bad = sampling.per_input(_broken(x, adapter.error_band)).any(1) | dead
    return x, j, bad, dead, keeper


class AdamDirection:
    r"""Adam's step direction without its step size: :math:`\hat m / (\sqrt{\hat v} + 10^{-30})`.

    Per coordinate and per start; its first step is :math:`\operatorname{sign} g`.
    """

    def __init__(self, like: Tensor, betas: tuple[float, float] = ADAM_BETAS, eps: float = 1e-30):
        self.betas, self.eps, self.t = betas, eps, 0
        self.m, self.v = torch.zeros_like(like), torch.zeros_like(like)

    def __call__(self, g: Tensor) -> Tensor:
        (b1, b2), self.t = self.betas, self.t + 1
        self.m = b1 * self.m + (1 - b1) * g
        self.v = b2 * self.v + (1 - b2) * g * g
        return (self.m / (1 - b1**self.t)) / ((self.v / (1 - b2**self.t)).sqrt() + self.eps)


def _direction(how: Search, adam: AdamDirection, g: Tensor) -> Tensor:
    """The unit step for gradient ``g`` under the search's rule and the budget's norm."""
    if how.rule == "adam":
        d = adam(g)
        return how.budget.direction(d) if how.budget.kind == "l2" else d
    return how.budget.direction(g)


def _gradient(adapter: Adapter, j: Tensor, yg: Tensor) -> Tensor:
    """``∇_y Σ J`` with non-finite objectives and gradients zeroed."""
    safe = torch.where(torch.isfinite(j), j, torch.zeros_like(j))
    if not safe.requires_grad:  # every reported gain is constant in y (additive sites): a zero gradient
        return torch.zeros_like(yg)
    (g,) = torch.autograd.grad(safe.sum(), yg, allow_unused=True)
    if g is None:  # the graph from the parameters reached the objective, but not from y
        raise AuditError(_UNDIFFERENTIABLE.format(adapter.family))
    return torch.nan_to_num(g.detach(), nan=0.0, posinf=0.0, neginf=0.0)


class _Path:
    """Per start along the search: broken yet (when, how far), frozen (non-finite), and the point to report.

    The reported point is a breaking one before any other, then the largest objective (steps are not monotone).
    """

    def __init__(self, y: Tensor, y0: Tensor, j: Tensor, bad: Tensor, dead: Tensor, budget: Budget):
        self.y0, self.budget, self.view = y0, budget, (-1, *[1] * (y0.dim() - 1))
        self.broken, self.frozen = bad, dead
        self.broken_step = torch.where(bad, 0, -1)
        self.to_break = torch.where(bad, budget.distance(y, y0), math.nan)
        self.best_y, self.best_bad = y, bad
        before = j.detach()
        self.best_j = torch.where(dead, math.inf, torch.where(torch.isfinite(before), before, -math.inf))

    def hold(self, y: Tensor, moved: Tensor) -> Tensor:
        """``moved``, except that a non-finite start stays where it went non-finite."""
        return torch.where(self.frozen.view(self.view), y, moved)

    def update(self, t: int, y: Tensor, j: Tensor, bad: Tensor, dead: Tensor) -> None:
        """Record step ``t``'s point ``y`` with its objective and break flags."""
        live = ~self.frozen
        newly = live & bad & ~self.broken
        self.broken_step = torch.where(newly, t + 1, self.broken_step)
        self.to_break = torch.where(newly, self.budget.distance(y.detach(), self.y0), self.to_break)
        self.broken = self.broken | (live & bad)
        jd = torch.where(dead, math.inf, j.detach())
        better = live & ((bad & ~self.best_bad) | ((bad == self.best_bad) & (jd > self.best_j)) | dead)
        self.best_y = torch.where(better.view(self.view), y, self.best_y)
        self.best_j = torch.where(better, jd, self.best_j)
        self.best_bad = self.best_bad | (better & bad)
        self.frozen = self.frozen | dead


def search(
    adapter: Adapter,
    y0: Tensor,
    latents: list[Tensor],
    sampling: Sampling,
    how: Search,
    step: tuple[float, float],
    valid: tuple[float, float] | None,
    bar=None,
) -> dict[str, Tensor]:
    """Attack one batch of starts ``y0`` (on the model's device); per-start results as tensors.

    ``step`` is ``(α₀, ρ)`` (:func:`default_step`); ``valid`` the range image conditions keep.
    Call under :func:`~flowaudit.config.device.auditing`; gradients are switched on here.
    """
    budget, (alpha, rho) = how.budget, step
    y = budget.project(y0.clone(), y0, valid)
    with torch.enable_grad():
        yg = y.detach().requires_grad_(True)
        _, j, bad, dead, first = _pass(adapter, yg, latents, sampling, how.objective, record=True)
        before, path, adam = j.detach(), _Path(y, y0, j, bad, dead, budget), AdamDirection(y)
        for t in range(how.steps):
            d = _direction(how, adam, _gradient(adapter, j, yg))
            y = path.hold(y, budget.project(y + (alpha * rho**t) * d, y0, valid))
            yg = y.detach().requires_grad_(True)
            _, j, bad, dead, _ = _pass(adapter, yg, latents, sampling, how.objective, record=False)
            path.update(t, y, j, bad, dead)
            if bar is not None:
                bar.update(len(y0))  # the bar counts steps of starts
    with torch.no_grad():
        x, j, bad, _, last = _pass(adapter, path.best_y, latents, sampling, how.objective, record=True)
    return _results(adapter, how, sampling, path, before, x, j, bad, first, last)


def _blow_up_layer(
    adapter: Adapter, how: Search, sampling: Sampling, first: GainKeeper, last: GainKeeper, n_starts: int
) -> Tensor:
    """Per start, the index of the first layer that blew up (see module docstring), -1 when none did."""
    names = [n for n in last.layer_max if n in first.layer_max]
    if not names:
        return torch.full((n_starts,), -1)
    floor = how.layer_factor * max(abs(v) for v in adapter.error_band)  # and past 10× any valid value
    grown = torch.stack(
        [
            (~torch.isfinite(last.layer_max[n]))
            | ((last.layer_max[n] > how.layer_factor * first.layer_max[n]) & (last.layer_max[n] > floor))
            for n in names
        ]
    )
    grown = sampling.per_input(grown.T).any(1).T  # (layers, starts)
    return torch.where(grown.any(0), grown.to(torch.int64).argmax(0), -1)


def _results(
    adapter: Adapter,
    how: Search,
    sampling: Sampling,
    path: _Path,
    before: Tensor,
    x: Tensor,
    j: Tensor,
    bad: Tensor,
    first: GainKeeper,
    last: GainKeeper,
) -> dict[str, Tensor]:
    """The per-start result tensors of :func:`search` at the reported point ``path.best_y``."""
    per, n = sampling.per_input, len(path.y0)
    sites = list(last.site_max)

    def by_site(keeper: GainKeeper) -> Tensor:
        return torch.stack([per(keeper.site_max[s]).amax(1) for s in sites]) if sites else torch.zeros(0, n)

    site_gain = by_site(last)
    rows = torch.full((n * sampling.samples,), math.nan, dtype=torch.float64)
    site_abs = torch.stack([per(last.site_abs.get(s, rows)).amax(1) for s in sites]) if sites else torch.zeros(0, n)
    count = [per(last.site_nonfinite.get(s, torch.zeros_like(rows, dtype=torch.int64))).sum(1) for s in sites]
    y = path.best_y.detach()
    return {
        "y": y,
        "x": per(x.detach()),
        "objective_before": before,
        "objective_after": j.detach(),
        "max_abs": per(_row_max_abs(x)).amax(1),
        "max_inverse_gain": site_gain.amax(0) if sites else torch.full((n,), math.nan),
        "nonfinite": per((~torch.isfinite(x.detach().flatten(1))).sum(1)).sum(1),
        "broken": path.broken | bad,
        "broken_step": path.broken_step,
        "distance_to_break": path.to_break,
        "distance": how.budget.distance(y, path.y0),
        "layer": _blow_up_layer(adapter, how, sampling, first, last, n),
        "site_gain": site_gain,
        "site_gain_before": by_site(first),
        "site_abs": site_abs,
        "site_nonfinite": torch.stack(count) if sites else torch.zeros(0, n, dtype=torch.int64),
        "_layers": [s for s in last.layer_max if s in first.layer_max],
        "_sites": sites,
    }
