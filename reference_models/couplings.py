r"""Conditional elementwise maps: the *sites* flowaudit audits.

Every map here is an elementwise bijection :math:`c(x; h)` whose parameters
:math:`h` come from a conditioner network (a coupling's NN on
:math:`[x_a, g(y)]`, an injector's NN on :math:`g(y)`, a split prior's NN).
The maps hold no parameters of their own; they are :class:`torch.nn.Module`
only so that forward hooks see every call, which is how the audit reads the
inverse gain :math:`1/c'` at the points actually visited while sampling.

Calling convention (one for all kinds)::

    out, ladj = site(inp, h, reverse=False)

``reverse=False`` maps data side → latent side, ``out = c(inp)`` and
``ladj = log c'(inp)`` elementwise. ``reverse=True`` maps latent → data,
``out = c^{-1}(inp)`` and ``ladj = -log c'(out)``, so ``exp(ladj)`` is the
inverse gain at the visited point.

Parameter layout of ``h`` for ``x`` of shape ``(B, C, *S)``: ``(B, C·P, *S)``.
Affine-type maps split it "cross" as SRFlow does (shift = channels 0::2,
raw scale = channels 1::2); spline maps view it as ``(B, C, P, *S)`` as the
paper's official spline code does.

Kinds (DESIGN.md §2): ``affine``, ``affine-bounded``, ``additive``,
``rq-spline``, ``modified-rq-spline``; :class:`GaussianPrior` is kind ``prior``.

References: Dinh et al. 2017 (affine), Lugmayr et al. 2020 (SRFlow's
``sigmoid(raw + 2) + 1e-4``), Durkan et al. 2019 (rational-quadratic splines),
Hong et al. 2023 §3.4 and S1.2 (the modified RQ-spline).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = [
    "KINDS",
    "Elementwise",
    "Affine",
    "AffineBounded",
    "Additive",
    "RQSpline",
    "ModifiedRQSpline",
    "GaussianPrior",
    "make_elementwise",
    "rational_quadratic",
]

KINDS = ("affine", "affine-bounded", "additive", "rq-spline", "modified-rq-spline")


class Elementwise(nn.Module):
    """Base class: an elementwise map ``c(x; h)``; subclasses define the math.

    Subclasses implement :meth:`_forward` (value and ``log c'``),
    :meth:`_inverse` and :meth:`derivative`; ``params_per_dim`` is ``P``.
    """

    kind: str = "unknown"
    params_per_dim: int = 1

    def forward(self, inp: Tensor, h: Tensor, reverse: bool = False) -> tuple[Tensor, Tensor]:
        if reverse:
            x = self._inverse(inp, h)
            return x, -self.log_derivative(x, h)
        return self._forward(inp, h)

    def log_derivative(self, x: Tensor, h: Tensor) -> Tensor:
        """``log c'(x; h)`` elementwise."""
        return self._forward(x, h)[1]

    def derivative(self, x: Tensor, h: Tensor) -> Tensor:
        """``c'(x; h)`` elementwise, broadcast to ``x``'s shape."""
        return self.log_derivative(x, h).exp()

    def _forward(self, x: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _inverse(self, y: Tensor, h: Tensor) -> Tensor:
        raise NotImplementedError

    def tail_bounds(self) -> tuple[float, float]:
        """Bounds of ``c'`` for large ``|x|`` over all parameters the kind allows (Remark 2's ``s_l, s_u``)."""
        return (0.0, float("inf"))

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"


def _cross(h: Tensor) -> tuple[Tensor, Tensor]:
    """SRFlow's "cross" split: shift = channels 0::2, raw scale = channels 1::2."""
    return h[:, 0::2], h[:, 1::2]


def _per_dim(h: Tensor, x: Tensor, p: int) -> Tensor:
    """View ``h`` (B, C·P, *S) as (B, C, *S, P)."""
    b, c = x.shape[:2]
    return h.reshape(b, c, p, *x.shape[2:]).movedim(2, -1)


class Affine(Elementwise):
    r"""SRFlow / Glow affine map :math:`c(x) = (x + t)\,s`, :math:`s = \sigma(r + 2) + \epsilon`.

    :math:`c'(x) = s \in (\epsilon, 1 + \epsilon)`; nothing bounds :math:`1/s`
    but :math:`1/\epsilon` = 10⁴, which is the exploding inverse of Remark 1.
    """

    kind = "affine"
    params_per_dim = 2

    def __init__(self, eps: float = 1e-4, offset: float = 2.0):
        super().__init__()
        self.eps, self.offset = eps, offset

    def scale(self, raw: Tensor) -> Tensor:
        return torch.sigmoid(raw + self.offset) + self.eps

    def _forward(self, x, h):
        t, raw = _cross(h)
        s = self.scale(raw)
        return (x + t) * s, torch.log(s).expand_as(x)

    def _inverse(self, y, h):
        t, raw = _cross(h)
        return y / self.scale(raw) - t

    def log_derivative(self, x, h):
        return torch.log(self.scale(_cross(h)[1])).expand_as(x)

    def tail_bounds(self):
        return (self.eps, 1.0 + self.eps)


class AffineBounded(Affine):
    r"""The paper's FS-NCSR† variant: :math:`s = \sigma(r + 2) + 0.1 \in (0.1, 1.1)`.

    The lower bound caps the inverse gain at 10 but the derivative bounds
    (0.1 and 1.1) still do not meet, so Remark 2 is violated.
    """

    kind = "affine-bounded"

    def __init__(self, low: float = 0.1, offset: float = 2.0):
        super().__init__(eps=low, offset=offset)


class Additive(Elementwise):
    r"""Additive map (NICE): :math:`c(x) = x + t`, :math:`c' \equiv 1`."""

    kind = "additive"
    params_per_dim = 1

    def _forward(self, x, h):
        return x + h, torch.zeros_like(x)

    def _inverse(self, y, h):
        return y - h

    def tail_bounds(self):
        return (1.0, 1.0)


def rational_quadratic(
    inp: Tensor, xk: Tensor, yk: Tensor, dk: Tensor, inverse: bool = False
) -> tuple[Tensor, Tensor]:
    r"""Monotone rational-quadratic spline through knots (Durkan et al. 2019, eq. 4–6).

    Knots ``xk``, ``yk`` (increasing) and derivatives ``dk`` have shape
    ``inp.shape + (K + 1,)``. ``inp`` must lie inside the knot range (callers
    clamp it; tails are theirs). Returns ``(out, log c'(x))`` where ``x`` is
    the data-side point (the output when ``inverse``).

    With :math:`\xi = (x - x_k)/w_k`, :math:`s_k = h_k / w_k`:

    .. math:: c(x) = y_k + \frac{h_k (s_k \xi^2 + d_k \xi(1-\xi))}
                     {s_k + (d_{k+1} + d_k - 2 s_k)\xi(1-\xi)}

    The inverse solves the quadratic :math:`a\xi^2 + b\xi + c = 0` with
    :math:`\xi = 2c / (-b - \sqrt{b^2 - 4ac})` when :math:`b \ge 0` and
    :math:`\xi = (-b + \sqrt{b^2 - 4ac}) / 2a` otherwise, the form that never
    cancels.
    """
    knots = yk if inverse else xk
    idx = torch.searchsorted(knots[..., 1:-1].contiguous(), inp.unsqueeze(-1).contiguous(), right=True)
    idx1 = idx + 1
    x0, x1 = xk.gather(-1, idx).squeeze(-1), xk.gather(-1, idx1).squeeze(-1)
    y0, y1 = yk.gather(-1, idx).squeeze(-1), yk.gather(-1, idx1).squeeze(-1)
    d0, d1 = dk.gather(-1, idx).squeeze(-1), dk.gather(-1, idx1).squeeze(-1)
    w, hgt = x1 - x0, y1 - y0
    s = hgt / w
    if inverse:
        # a, b written with dy1 = y1 - y so that no two terms of size hgt·d cancel when d ≫ s
        dy, dy1 = inp - y0, y1 - inp
        a = hgt * s - d0 * dy1 + dy * (d1 - 2 * s)
        b = d0 * dy1 - dy * (d1 - 2 * s)
        c = -s * dy
        root = torch.sqrt((b * b - 4 * a * c).clamp_min(0))
        # the stable root of a·ξ² + b·ξ + c = 0 in [0, 1]: never subtract nearly equal numbers;
        # pick numerator and denominator first so the unused branch cannot put NaN in gradients
        first = b >= 0
        num = torch.where(first, 2 * c, -b + root)
        den = torch.where(first, -b - root, 2 * a)
        xi = (num / torch.where(den == 0, torch.ones_like(den), den)).clamp(0, 1)  # den = 0 only where num = 0
        out = x0 + xi * w
    else:
        xi = ((inp - x0) / w).clamp(0, 1)
        num = hgt * (s * xi**2 + d0 * xi * (1 - xi))
        out = y0 + num / (s + (d1 + d0 - 2 * s) * xi * (1 - xi))
    one_m = 1 - xi
    den = s + (d1 + d0 - 2 * s) * xi * one_m
    deriv_num = s**2 * (d1 * xi**2 + 2 * s * xi * one_m + d0 * one_m**2)
    ladj = torch.log(deriv_num) - 2 * torch.log(den)
    return out, ladj


class _SplineWithTails(Elementwise):
    """Shared tail handling: identity (plus ``bias``) outside the spline's interval."""

    def _knots(self, x: Tensor, h: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Return ``xk, yk, dk`` (shape ``x.shape + (K+1,)``) and the bias ``t``."""
        raise NotImplementedError

    def _spline(self, inp: Tensor, h: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        xk, yk, dk, t = self._knots(inp, h)
        z = inp - t if inverse else inp  # the bias acts after the spline
        lo, hi = xk[..., 0], xk[..., -1]  # end knots sit on the diagonal
        inside = (z >= lo) & (z <= hi)
        out, ladj = rational_quadratic(torch.maximum(torch.minimum(z, hi), lo), xk, yk, dk, inverse)
        out = torch.where(inside, out, z)
        ladj = torch.where(inside, ladj, torch.zeros_like(ladj))
        return (out if inverse else out + t), ladj

    def tail_bounds(self):
        return (1.0, 1.0)  # identity (plus bias) outside the spline's interval

    def _forward(self, x, h):
        return self._spline(x, h, inverse=False)

    def _inverse(self, y, h):
        return self._spline(y, h, inverse=True)[0]


class ModifiedRQSpline(_SplineWithTails):
    r"""The paper's remedy (Hong et al. 2023, Fig. 5b and S1.2).

    Two rational-quadratic bins on :math:`[B_1, B_2]` with fixed end knots
    :math:`(B_1, B_1)`, :math:`(B_2, B_2)` of derivative 1 and one learnable
    interior knot :math:`(x_m, y_m, d_m)`, then a bias :math:`t` everywhere:

    .. math:: c(x) = \begin{cases} \mathrm{RQ}(x) + t & x \in [B_1, B_2] \\
                                    x + t & \text{otherwise} \end{cases}

    :math:`x_m, y_m = B_1 + \epsilon + (B_2 - B_1 - 2\epsilon)\,\sigma(\cdot)`,
    :math:`d_m = \epsilon + (1 - \epsilon)\exp(\min(\cdot, \log 1/\epsilon))`. Per-dimension parameters
    in the official order: width logit, height logit, derivative logit, bias.
    Zero parameters give exactly the identity; :math:`c' = 1` on both tails,
    so Remark 2 holds for every condition.
    """

    kind = "modified-rq-spline"
    params_per_dim = 4

    def __init__(self, bounds: tuple[float, float] = (-0.5, 0.5), eps: float = 1e-3):
        super().__init__()
        self.b1, self.b2 = float(bounds[0]), float(bounds[1])
        self.eps = eps

    def _knots(self, x, h):
        p = _per_dim(h, x, 4)
        span = self.b2 - self.b1 - 2 * self.eps
        xm = self.b1 + self.eps + span * torch.sigmoid(p[..., 0])
        ym = self.b1 + self.eps + span * torch.sigmoid(p[..., 1])
        # slope in (ε, 1/ε]: the cap keeps float32 gradients finite (e^50 overflows their products)
        dm = self.eps + (1 - self.eps) * torch.exp(p[..., 2].clamp(max=math.log(1 / self.eps)))
        b1, b2 = torch.full_like(xm, self.b1), torch.full_like(xm, self.b2)
        one = torch.ones_like(xm)
        xk = torch.stack([b1, xm, b2], -1)
        yk = torch.stack([b1, ym, b2], -1)
        dk = torch.stack([one, dm, one], -1)
        return xk, yk, dk, p[..., 3]

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, bounds=({self.b1}, {self.b2})"


class RQSpline(_SplineWithTails):
    r"""Neural spline of Durkan et al. (2019): ``bins`` RQ bins on :math:`[-B, B]`, identity tails.

    Widths and heights are softmax-normalised with a floor ``min_bin``,
    interior derivatives :math:`\epsilon + \mathrm{softplus}(r + \log(e^{1-\epsilon} - 1))`
    (so zero parameters give derivative 1); boundary derivatives are 1.
    Parameters per dimension: ``3·bins − 1`` (widths, heights, derivatives).
    """

    kind = "rq-spline"

    def __init__(self, bins: int = 8, bound: float = 3.0, min_bin: float = 1e-3, min_derivative: float = 1e-3):
        super().__init__()
        self.bins, self.bound = bins, float(bound)
        self.min_bin, self.min_derivative = min_bin, min_derivative
        self.params_per_dim = 3 * bins - 1

    def _cumknots(self, logits: Tensor) -> Tensor:
        w = torch.softmax(logits, -1)
        w = self.min_bin + (1 - self.min_bin * self.bins) * w
        inner = -self.bound + 2 * self.bound * torch.cumsum(w, -1)[..., :-1]
        # both ends pinned exactly so the identity tails join without a gap
        lo = torch.full_like(inner[..., :1], -self.bound)
        return torch.cat([lo, inner, -lo], -1)

    def _knots(self, x, h):
        k = self.bins
        p = _per_dim(h, x, self.params_per_dim)
        xk = self._cumknots(p[..., :k])
        yk = self._cumknots(p[..., k : 2 * k])
        const = math.log(math.expm1(1 - self.min_derivative))
        d_inner = self.min_derivative + torch.nn.functional.softplus(p[..., 2 * k :] + const)
        one = torch.ones_like(d_inner[..., :1])
        dk = torch.cat([one, d_inner, one], -1)
        return xk, yk, dk, torch.zeros_like(x)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, bins={self.bins}, bound={self.bound}"


class GaussianPrior(Elementwise):
    r"""A conditional (split) prior as a site: :math:`x = \mu(h) + \sigma(h)\,\varepsilon`.

    Forward maps a value to its standardised noise
    :math:`\varepsilon = (x - \mu) e^{-\log\sigma}`, so :math:`c' = 1/\sigma`
    and the inverse gain while sampling is :math:`\sigma`. ``h`` is split
    cross: mean = channels 0::2, log σ = channels 1::2 (SRFlow's Split2d).
    """

    kind = "prior"
    params_per_dim = 2

    def _forward(self, x, h):
        mean, logs = _cross(h)
        return (x - mean) * torch.exp(-logs), (-logs).expand_as(x)

    def _inverse(self, y, h):
        mean, logs = _cross(h)
        return mean + y * torch.exp(logs)

    def log_derivative(self, x, h):
        return (-_cross(h)[1]).expand_as(x)


def make_elementwise(kind: str, **options) -> Elementwise:
    """Build the elementwise map for a kind name (DESIGN.md §2)."""
    table = {
        "affine": Affine,
        "affine-bounded": AffineBounded,
        "additive": Additive,
        "rq-spline": RQSpline,
        "modified-rq-spline": ModifiedRQSpline,
    }
    if kind not in table:
        raise ValueError(f"unknown coupling kind {kind!r}; choose one of {', '.join(KINDS)}")
    return table[kind](**options)
