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

Kinds: ``affine``, ``affine-bounded``, ``additive``,
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
    derivative_constant: bool = False  # whether c' is the same at every x (affine in x)

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
    derivative_constant = True  # c' does not depend on x

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
    derivative_constant = True  # c' does not depend on x

    def _forward(self, x, h):
        return x + h, torch.zeros_like(x)

    def _inverse(self, y, h):
        return y - h

    def tail_bounds(self):
        return (1.0, 1.0)


def rational_quadratic(inp: Tensor, xk: Tensor, yk: Tensor, dk: Tensor, inverse: bool = False) -> tuple[Tensor, Tensor]:
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


def _flag(compare, a: Tensor, b: Tensor | float) -> Tensor:
    """``compare(a, b)`` as a 0/1 tensor of ``a``'s dtype, written straight into it (no bool pass)."""
    return compare(a.detach(), b.detach() if isinstance(b, Tensor) else b, out=torch.empty_like(a, requires_grad=False))


def _pick(flag: Tensor, then: Tensor, other: Tensor) -> Tensor:
    """``where(flag, then, other)`` for a 0/1 ``flag`` and finite operands, exactly.

    ``lerp`` returns an end point exactly at weight 0 or 1 and runs vectorised; ``torch.where``
    branches per element, which costs ~10× as much on a random mask (the bin of a spline).
    """
    return torch.lerp(other, then, flag)


class _ModifiedRQForward(torch.autograd.Function):
    r"""The modified spline's forward pass with a hand-written backward (training's hot path).

    Autograd through the closed form records ~60 elementwise nodes whose backward costs several
    times the forward; this backward is the chain rule written out once. With
    :math:`q = \xi(1 - \xi)`, :math:`A = s\xi^2 + d_0 q`, :math:`D = s + (d_0 + d_1 - 2s)q`,
    :math:`N = d_1\xi^2 + 2sq + d_0(1 - \xi)^2`: :math:`c = y_0 + HA/D`,
    :math:`\log c' = 2\log s + \log N - 2\log D`, :math:`\xi = (x - x_0)/w`, :math:`s = H/w` (bin
    width :math:`w`, height :math:`H`), then the bin's :math:`(x_0, w, y_0, H, d_0, d_1)` back onto
    :math:`(x_m, y_m, d_m)` and those onto the raw parameters. A backward that must itself be differentiable
    (``create_graph``: double backward, a JVP through autograd) goes through autograd of the general path instead.
    """

    @staticmethod
    def forward(ctx, site, x, h):
        out, ladj, saved = site._evaluate(x, h)
        ctx.site, ctx.saved, ctx.h_shape = site, saved, h.shape
        ctx.save_for_backward(x, h)
        return out, ladj

    @staticmethod
    def backward(ctx, g_out, g_ladj):
        if torch.is_grad_enabled():  # create_graph=True
            return _ModifiedRQForward._differentiable_backward(ctx, g_out, g_ladj)
        site, v = ctx.site, ctx.saved
        inside, xi, xi2, one_m, one_m2, w, hgt, s, two_s, d0, d1, num, den, inner = (
            v[k]
            for k in (
                "inside",
                "xi",
                "xi2",
                "one_m",
                "one_m2",
                "w",
                "hgt",
                "s",
                "two_s",
                "d0",
                "d1",
                "num",
                "den",
                "inner",
            )
        )
        # no graph is recorded here (create_graph went the other way), so temporaries update in place,
        # each in place only by tensors made of the same incoming gradients: under vmap (as
        # jacobian(vectorize=True) runs it) one of g_out, g_ladj may be batched and the other not
        gu, gl = g_out * inside, g_ladj * inside
        q = xi * one_m
        ratio = num / den
        g_num = (gu * hgt).div_(den)  # ∂/∂A
        g_den = torch.add(g_num * ratio, (2 * gl).div_(den)).neg_()  # ∂/∂D
        g_s = torch.add(g_num * xi2, (2 * gl).div_(s))  # 2/s from log s²
        g_n = gl.div_(inner)  # ∂/∂N
        one_m2xi = one_m - xi  # 1 − 2ξ
        g_s.addcmul_(g_den, (-2 * q).add_(1)).addcmul_(g_n, q, value=2)
        g_d0 = (g_num + g_den).mul_(q).addcmul_(g_n, one_m2)
        g_d1 = (g_den * q).addcmul_(g_n, xi2)
        g_xi = g_den * (d1 + d0).sub_(two_s).mul_(one_m2xi)  # D_ξ = (d0 + d1 − 2s)(1 − 2ξ)
        g_xi.addcmul_((two_s * xi).addcmul_(d0, one_m2xi), g_num)  # A_ξ = 2sξ + d0(1 − 2ξ)
        g_xi.addcmul_((d1 * xi).addcmul_(s, one_m2xi).sub_(d0 * one_m), g_n, value=2)  # N_ξ / 2
        g_zc = g_xi.div_(w)
        g_s_w = g_s.div_(w)
        g_w = (g_zc * xi).addcmul_(g_s_w, s).neg_()
        g_hgt = g_s_w.addcmul_(gu, ratio)
        right = v["right"]
        g_xm = _pick(right, (g_zc + g_w).neg_(), g_w)  # right bin: x0 = x_m, w = B2 − x_m; left: w = x_m − B1
        g_ym = _pick(right, gu - g_hgt, g_hgt)  # right: y0 = y_m, h = B2 − y_m; left: h = y_m − B1
        g_dm = _pick(right, g_d0, g_d1)
        span = site.b2 - site.b1 - 2 * site.eps
        sig0, sig1, e2, p2 = v["sig0"], v["sig1"], v["e2"], v["p2"]
        g_p0 = g_xm.mul_(span * sig0).mul_(1 - sig0)
        g_p1 = g_ym.mul_(span * sig1).mul_(1 - sig1)
        # the clamp passes p2 ≤ cap
        g_p2 = g_dm.mul_((1 - site.eps) * e2).mul_(_flag(torch.le, p2, math.log(1 / site.eps)))
        g_x = g_zc.addcmul_(g_out, 1 - inside)  # tails: identity
        g_h = torch.stack([g_p0, g_p1, g_p2, g_out], 2).reshape(ctx.h_shape)
        return None, g_x, g_h

    @staticmethod
    def _differentiable_backward(ctx, g_out, g_ladj):
        needs = ctx.needs_input_grad[1:]
        inputs = [t for t, need in zip(ctx.saved_tensors, needs) if need]
        out, ladj = _SplineWithTails._spline(ctx.site, *ctx.saved_tensors, inverse=False)
        grads = iter(torch.autograd.grad((out, ladj), inputs, (g_out, g_ladj), create_graph=True, allow_unused=True))
        return (None, *(next(grads) if need else None for need in needs))


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

    Closed form, no bin search: the bin is the left one, :math:`(x_0, x_1, y_0, y_1, d_0, d_1)
    = (B_1, x_m, B_1, y_m, 1, d_m)`, below the interior knot (:math:`x < x_m`, or :math:`y < y_m`
    inverting) and the right one, :math:`(x_m, B_2, y_m, B_2, d_m, 1)`, from it on — one
    comparison per element; the formulas, their order of operations and so their values are
    those of :func:`rational_quadratic` (``tests/test_couplings.py`` holds the two equal).
    """

    kind = "modified-rq-spline"
    params_per_dim = 4

    def __init__(self, bounds: tuple[float, float] = (-0.5, 0.5), eps: float = 1e-3):
        super().__init__()
        self.b1, self.b2 = float(bounds[0]), float(bounds[1])
        self.eps = eps

    def _interior(self, x: Tensor, h: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The interior knot ``x_m, y_m``, its slope ``d_m`` and the bias ``t``, each shaped like ``x``."""
        return self._interior_parts(x, h)[:4]

    def _interior_parts(self, x: Tensor, h: Tensor) -> tuple[Tensor, ...]:
        """``x_m, y_m, d_m, t`` and, for the backward pass, ``σ(h_0), σ(h_1), e^{min(h_2, log 1/ε)}, h_2``."""
        # (B, C, P, *S) views, h[:, 4c + k] = p_k[:, c]; unbind's backward is one stack, where four
        # selects (or _per_dim's movedim) would each scatter into a zero tensor of h's size
        p0, p1, p2, t = h.reshape(x.shape[0], x.shape[1], 4, *x.shape[2:]).unbind(2)
        span = self.b2 - self.b1 - 2 * self.eps
        sig0, sig1 = torch.sigmoid(p0), torch.sigmoid(p1)
        xm = (span * sig0).add_(self.b1 + self.eps)  # B1 + ε + span·σ
        ym = (span * sig1).add_(self.b1 + self.eps)
        # slope in (ε, 1/ε]: the cap keeps float32 gradients finite (e^50 overflows their products)
        e2 = torch.exp(p2.clamp(max=math.log(1 / self.eps)))
        dm = ((1 - self.eps) * e2).add_(self.eps)
        return xm, ym, dm, t, sig0, sig1, e2, p2

    def _knots(self, x, h):
        xm, ym, dm, t = self._interior(x, h)
        b1, b2 = torch.full_like(xm, self.b1), torch.full_like(xm, self.b2)
        one = torch.ones_like(xm)
        xk = torch.stack([b1, xm, b2], -1)
        yk = torch.stack([b1, ym, b2], -1)
        dk = torch.stack([one, dm, one], -1)
        return xk, yk, dk, t

    def _clamped(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``z`` clamped to ``[B_1, B_2]`` (NaN to ``B_1``, so the spline's own values stay finite) and 1 inside."""
        zc = z.clamp(self.b1, self.b2).nan_to_num_(nan=self.b1)  # fmax / fmin cost 10× as much
        return zc, _flag(torch.eq, zc, z)

    def _bin(self, right: Tensor, xm: Tensor, ym: Tensor, dm: Tensor):
        """``x_0, w, y_0, y_1, h, s = h / w, d_0, d_1`` of the bin each element is in (``right`` = 1: the right one)."""
        # 0-dim constants made on the device by a fill (new_tensor would copy from the host)
        b1, b2, one = (torch.full((), v, dtype=xm.dtype, device=xm.device) for v in (self.b1, self.b2, 1.0))
        x0, x1 = _pick(right, xm, b1), _pick(right, b2, xm)
        y0, y1 = _pick(right, ym, b1), _pick(right, b2, ym)
        d0, d1 = _pick(right, dm, one), _pick(right, one, dm)
        w, hgt = x1.sub_(x0), y1 - y0
        return x0, w, y0, y1, hgt, hgt / w, d0, d1

    @staticmethod
    def _log_slope(xi: Tensor, s: Tensor, d0: Tensor, d1: Tensor) -> tuple[Tensor, dict]:
        """``log c'`` inside the bin at ``ξ`` (Durkan et al. eq. 5) and its pieces (``ξ²``, ``1 − ξ``, ...)."""
        one_m, xi2, two_s = 1 - xi, xi**2, 2 * s
        den = (d1 + d0).sub_(two_s).mul_(xi).mul_(one_m).add_(s)  # s + (d1 + d0 − 2s)·ξ·(1 − ξ)
        one_m2 = one_m**2
        inner = (d1 * xi2).add_((two_s * xi).mul_(one_m)).add_(d0 * one_m2)  # d1ξ² + 2sξ(1 − ξ) + d0(1 − ξ)²
        deriv_num = (s**2).mul_(inner)
        parts = dict(one_m=one_m, xi2=xi2, two_s=two_s, den=den, one_m2=one_m2, inner=inner)
        return deriv_num.log_().sub_(torch.log(den).mul_(2)), parts

    def _log_derivative(self, x: Tensor, xm: Tensor, ym: Tensor, dm: Tensor) -> Tensor:
        zc, inside = self._clamped(x)
        x0, w, _, _, _, s, d0, d1 = self._bin(_flag(torch.ge, zc, xm), xm, ym, dm)
        xi = (zc - x0).div_(w).clamp_(0, 1)
        return self._log_slope(xi, s, d0, d1)[0].mul_(inside)  # 0 on the tails

    def log_derivative(self, x, h):
        return self._log_derivative(x, *self._interior(x, h)[:3])

    def _forward(self, x, h):
        if (
            torch.is_grad_enabled()
            and (x.requires_grad or h.requires_grad)
            and not torch._C._are_functorch_transforms_active()
        ):  # torch.func: plain autograd below
            return _ModifiedRQForward.apply(self, x, h)
        return self._evaluate(x, h)[:2]

    def _evaluate(self, x: Tensor, h: Tensor) -> tuple[Tensor, Tensor, dict]:
        """``c(x)``, ``log c'(x)`` and what :class:`_ModifiedRQForward` needs for the gradients."""
        xm, ym, dm, t, sig0, sig1, e2, p2 = self._interior_parts(x, h)
        zc, inside = self._clamped(x)
        right = _flag(torch.ge, zc, xm)
        x0, w, y0, _, hgt, s, d0, d1 = self._bin(right, xm, ym, dm)
        xi = (zc - x0).div_(w).clamp_(0, 1)
        ladj, parts = self._log_slope(xi, s, d0, d1)
        num = (s * parts["xi2"]).add_((d0 * xi).mul_(parts["one_m"]))  # sξ² + d0ξ(1 − ξ)
        out = (hgt * num).div_(parts["den"]).add_(y0)
        # x itself on the tails; products by 0/1 keep both exact (x may be ±inf there, out never is)
        out = out.mul_(inside).addcmul_(x, 1 - inside).add_(t)
        saved = dict(
            parts,
            inside=inside,
            right=right,
            xi=xi,
            w=w,
            hgt=hgt,
            s=s,
            d0=d0,
            d1=d1,
            num=num,
            sig0=sig0,
            sig1=sig1,
            e2=e2,
            p2=p2,
        )
        return out, ladj.mul_(inside), saved

    def _solve(
        self, y: Tensor, xm: Tensor, ym: Tensor, dm: Tensor, t: Tensor, with_ladj: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        z = y - t  # the bias acts after the spline
        zc, inside = self._clamped(z)
        x0, w, y0, y1, hgt, s, d0, d1 = self._bin(_flag(torch.ge, zc, ym), xm, ym, dm)
        # the quadratic of rational_quadratic(inverse=True), written with dy1 = y1 - y (no cancellation)
        # (in-place steps only on temporaries no backward formula keeps, so autograd still works)
        dy, dy1 = zc - y0, y1.sub_(zc)
        e, f = dy1.mul_(d0), (2 * s).neg_().add_(d1).mul_(dy)  # d0·dy1, dy·(d1 − 2s)
        a = (hgt * s).sub_(e).add_(f)
        b = e.sub_(f)
        c = (s * dy).neg_()
        root = (b * b).sub_((4 * a).mul_(c)).clamp_min_(0).sqrt_()  # √(b² − 4ac)
        first = _flag(torch.ge, b, 0.0)
        minus_b = -b
        num = _pick(first, 2 * c, minus_b + root)
        den = _pick(first, minus_b.sub_(root), a.mul_(2))
        den = den.add_(_flag(torch.eq, den, 0.0))  # den = 0 only where num = 0: divide by 1 there
        xi = num.div_(den).clamp_(0, 1)
        x = xi.mul_(w).add_(x0)
        out = (x * inside).addcmul_(z, 1 - inside)  # x0 + ξw inside, z on the tails
        if not with_ladj:
            return out, None
        # log c' at the point found, as _log_derivative(out) computes it (ξ from out, not the solve's ξ,
        # whose log c' can differ by far more than rounding where c' varies fast), in the bin of the
        # solve: out's own bin wherever out did not round across the interior knot or B2, and at
        # those two points c' is continuous, so the other bin's formula gives it to rounding
        xi = x.sub_(x0).div_(w).clamp_(0, 1)  # from x0 + ξw, finite also where out is a NaN tail
        return out, self._log_slope(xi, s, d0, d1)[0].mul_(inside)

    def _inverse(self, y, h):
        return self._solve(y, *self._interior(y, h))[0]

    def forward(self, inp: Tensor, h: Tensor, reverse: bool = False) -> tuple[Tensor, Tensor]:
        if not reverse:
            return self._forward(inp, h)
        x, ladj = self._solve(inp, *self._interior(inp, h), with_ladj=True)
        return x, ladj.neg_()

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
    derivative_constant = True  # c' does not depend on x

    def __init__(self, unit_sigma: bool = False):
        super().__init__()
        self.unit_sigma = unit_sigma  # the model always passes log σ = 0 (LLFlow's N(μ(y), I)): c' ≡ 1

    def tail_bounds(self) -> tuple[float, float]:
        """``c' = 1/σ``: (1, 1) when σ is fixed at 1 by the model, else unbounded (σ comes from the condition)."""
        return (1.0, 1.0) if self.unit_sigma else super().tail_bounds()

    def _forward(self, x, h):
        mean, logs = _cross(h)
        return (x - mean) * torch.exp(-logs), (-logs).expand_as(x)

    def _inverse(self, y, h):
        mean, logs = _cross(h)
        return mean + y * torch.exp(logs)

    def log_derivative(self, x, h):
        return (-_cross(h)[1]).expand_as(x)


def make_elementwise(kind: str, **options) -> Elementwise:
    """Build the elementwise map for a kind name."""
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
