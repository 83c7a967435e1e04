"""The conditional elementwise sites: one property suite run over every kind (zuko's habit).

Every kind of :data:`KINDS` and the ``prior`` site (:class:`GaussianPrior`) go through
the same checks: shapes, inversion (float64 and float32, on random inputs, on
|x| up to 1e3 and exactly on the spline knots), ``ladj`` and ``derivative``
against autograd, the full toy :class:`Coupling` log-det against
``torch.autograd.functional.jacobian``, and hypothesis properties (inversion
with a condition-aware tolerance, monotonicity) over conditioner outputs in
[-20, 20]. Kind-specific contracts (tails, bounds, extreme parameters) follow.

Round-trip tolerances: an elementwise inverse can at best recover ``x`` up to
the rounding of ``y = c(x)`` amplified by ``1/c'(x)``; the fixed-tolerance tests
use moderate conditioner outputs (the float32 ones N(0, 0.5²): with N(0, 1)
an RQ-spline's ``c'`` already reaches 1e-4 and the float32 round trip is
limited by that conditioning, whatever the code), the hypothesis tests scale
the tolerance by ``max(1, 1/c')`` instead.
"""

from __future__ import annotations

import itertools
import math
import re

import pytest
import torch
from flowaudit.reference_models.couplings import (
    KINDS,
    Additive,
    Affine,
    AffineBounded,
    Elementwise,
    GaussianPrior,
    ModifiedRQSpline,
    RQSpline,
    make_elementwise,
)
from flowaudit.reference_models.toy import Coupling
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SITES = KINDS + ("prior",)
SPLINES = ("rq-spline", "modified-rq-spline")
DTYPES = {"float64": (torch.float64, 1e-9, 1.0), "float32": (torch.float32, 1e-5, 0.5)}  # dtype, tol, h scale

PROPERTY = settings(
    max_examples=50, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)


def site_of(kind: str) -> Elementwise:
    return GaussianPrior() if kind == "prior" else make_elementwise(kind)


def params(site: Elementwise, x: torch.Tensor, scale: float, gen: torch.Generator) -> torch.Tensor:
    """Conditioner output ``h`` of shape (B, C·P, *S) for ``x`` of shape (B, C, *S)."""
    b, c, *s = x.shape
    return scale * torch.randn(b, c * site.params_per_dim, *s, generator=gen, dtype=torch.float64).to(x.dtype)


def interval(site: Elementwise) -> tuple[float, float]:
    if isinstance(site, ModifiedRQSpline):
        return site.b1, site.b2
    return -site.bound, site.bound


def random_inputs(shape, dtype, gen) -> torch.Tensor:
    """Half N(0, 2²) (the splines' inner region and tails), half uniform on ±1e3, plus 0 and ±1e3."""
    n = math.prod(shape)
    x = torch.cat(
        [
            2 * torch.randn(n // 2, generator=gen, dtype=torch.float64),
            torch.empty(n - n // 2, dtype=torch.float64).uniform_(-1e3, 1e3, generator=gen),
        ]
    )
    x = x[torch.randperm(n, generator=gen)]
    x[:3] = torch.tensor([0.0, 1e3, -1e3])
    return x.reshape(shape).to(dtype)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / b.abs().clamp_min(1)).max())


# -- shapes and the factory ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", SITES)
@pytest.mark.parametrize("shape", [(3, 2), (2, 3, 4, 5)], ids=["vector", "image"])
def test_shapes_and_kind(kind, shape):
    site = site_of(kind)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen)
    h = params(site, x, 1.0, gen)
    for reverse in (False, True):
        out, ladj = site(x, h, reverse=reverse)
        assert out.shape == ladj.shape == x.shape
    assert site.derivative(x, h).shape == site.log_derivative(x, h).shape == x.shape
    assert site.kind == kind
    assert list(site.parameters()) == []  # sites are parameter-free: the conditioner owns h


@pytest.mark.parametrize("kind", SITES)
def test_parameter_layout_is_per_element(kind):
    """out[b, c, s] depends on h[b, c·P:(c+1)·P, s] only (both layouts, cross and per-dim, put them there)."""
    site = site_of(kind)
    p = site.params_per_dim
    gen = torch.Generator().manual_seed(9)
    x = 0.3 * torch.randn(2, 3, 2, generator=gen, dtype=torch.float64)  # inside the splines' intervals
    h = params(site, x, 1.0, gen)
    jac = torch.autograd.functional.jacobian(lambda hh: site(x, hh)[0], h)  # (B, C, S, B, C·P, S)
    allowed = torch.zeros_like(jac, dtype=torch.bool)
    for b, c, s in itertools.product(range(2), range(3), range(2)):
        allowed[b, c, s, b, c * p : (c + 1) * p, s] = True
    assert (jac[~allowed] == 0).all()
    assert (jac[allowed] != 0).any()


def test_make_elementwise_builds_every_kind_and_rejects_unknown():
    expected = {
        "affine": Affine,
        "affine-bounded": AffineBounded,
        "additive": Additive,
        "rq-spline": RQSpline,
        "modified-rq-spline": ModifiedRQSpline,
    }
    assert set(expected) == set(KINDS)
    for kind in KINDS:
        site = make_elementwise(kind)
        assert type(site) is expected[kind] and site.kind == kind
    assert make_elementwise("rq-spline", bins=4).params_per_dim == 11  # options reach the constructor
    with pytest.raises(ValueError) as info:
        make_elementwise("sigmoid-flow")
    message = str(info.value)
    assert "sigmoid-flow" in message
    listed = set(re.findall(r"[a-z][a-z-]*[a-z]", message.split("sigmoid-flow", 1)[1]))
    assert set(KINDS) <= listed  # every kind by its full name, not just as a substring of another


# -- inversion -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("kind", SITES)
def test_round_trip(kind, dtype_name):
    dtype, tol, scale = DTYPES[dtype_name]
    site = site_of(kind)
    gen = torch.Generator().manual_seed(1)
    for shape in [(256, 3), (4, 2, 3, 5)]:
        x = random_inputs(shape, dtype, gen)
        h = params(site, x, scale, gen)
        y, ladj = site(x, h)
        back, _ = site(y, h, reverse=True)
        assert torch.isfinite(y).all() and torch.isfinite(ladj).all()
        assert rel_err(back, x) <= tol
        # and latent → data → latent: c(c⁻¹(y)) = y for y drawn like the latents are
        z = random_inputs(shape, dtype, gen)
        x2, _ = site(z, h, reverse=True)
        assert rel_err(site(x2, h)[0], z) <= tol


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("kind", SPLINES)
def test_round_trip_exactly_on_the_knots(kind, dtype_name):
    """x on every knot (the interval ends ±B / B1, B2 and the interior knots, from ``_knots``)."""
    dtype, tol, scale = DTYPES[dtype_name]
    site = site_of(kind)
    gen = torch.Generator().manual_seed(2)
    x = torch.zeros(64, 3, dtype=dtype)
    h = params(site, x, scale, gen)
    xk, yk, dk, t = site._knots(x, h)
    lo, hi = interval(site)
    assert torch.equal(xk[..., 0], torch.full_like(x, lo)) and torch.equal(xk[..., -1], torch.full_like(x, hi))
    assert torch.equal(yk[..., 0], xk[..., 0]) and torch.equal(yk[..., -1], xk[..., -1])
    for k in range(xk.shape[-1]):
        on_knot = xk[..., k]
        y, ladj = site(on_knot, h)
        assert rel_err(y, yk[..., k] + t) <= tol  # the knots are interpolated
        assert rel_err(ladj, dk[..., k].log()) <= max(tol, 1e-6)  # with the knot's derivative
        assert rel_err(site(y, h, reverse=True)[0], on_knot) <= tol
        # the inverse maps a y-knot (plus the bias) onto its x-knot
        assert rel_err(site(yk[..., k] + t, h, reverse=True)[0], on_knot) <= tol


# -- derivatives against autograd ----------------------------------------------------------------


def _points(site, n, gen):
    """float64 points on both tails and inside the spline interval (away from the knots)."""
    x = torch.cat(
        [
            torch.empty(n, dtype=torch.float64).uniform_(-4, 4, generator=gen),
            torch.empty(n, dtype=torch.float64).uniform_(-1e3, 1e3, generator=gen),
        ]
    )
    if kind_is_spline(site):
        lo, hi = interval(site)
        x = torch.cat([x, torch.empty(n, dtype=torch.float64).uniform_(lo, hi, generator=gen)])
    return x.reshape(-1, 1)


def kind_is_spline(site) -> bool:
    return isinstance(site, (RQSpline, ModifiedRQSpline))


@pytest.mark.parametrize("kind", SITES)
def test_ladj_and_derivative_match_autograd(kind):
    site = site_of(kind)
    gen = torch.Generator().manual_seed(3)
    x = _points(site, 40, gen).repeat(1, 2)  # C = 2: channels must not mix
    h = params(site, x, 1.0, gen)

    # ladj = log c'(x): autograd on the sum is exact because the Jacobian is diagonal
    xg = x.clone().requires_grad_(True)
    y, ladj = site(xg, h)
    (grad,) = torch.autograd.grad(y.sum(), xg)
    assert torch.allclose(ladj, grad.log(), rtol=1e-9, atol=1e-9)
    assert torch.allclose(site.log_derivative(x, h), ladj, rtol=1e-12, atol=1e-12)

    # derivative = the JVP with a tangent of ones (autograd's double-backward JVP; torch.func's forward
    # mode would jit-script torch's decompositions on first use, seconds on a busy 2-core box)
    _, jvp = torch.autograd.functional.jvp(lambda inp: site(inp, h)[0], x, torch.ones_like(x))
    assert torch.allclose(site.derivative(x, h), jvp, rtol=1e-9, atol=1e-12)
    assert (site.derivative(x, h) > 0).all()

    # reverse: ladj = -log c'(x) at the output point x = c⁻¹(y), which is also log dx/dy
    yg = y.detach().clone().requires_grad_(True)
    back, ladj_rev = site(yg, h, reverse=True)
    (dxdy,) = torch.autograd.grad(back.sum(), yg)
    assert torch.allclose(ladj_rev, -site.log_derivative(back.detach(), h), rtol=1e-12, atol=1e-12)
    assert torch.allclose(ladj_rev, dxdy.log(), rtol=1e-9, atol=1e-9)
    assert torch.allclose(ladj_rev.exp(), 1 / site.derivative(back.detach(), h), rtol=1e-9)


@pytest.mark.parametrize("kind", SITES)
@pytest.mark.parametrize("dim", [2, 3])
def test_coupling_logdet_matches_autograd_jacobian(kind, dim):
    """A full toy Coupling (x_a passes through, x_b = c(x_b; NN([x_a, cond]))): log|det J| by autograd."""
    torch.manual_seed(4)
    site = site_of(kind)
    cond_dim = 3
    net = torch.nn.Sequential(
        torch.nn.Linear(1 + cond_dim, 16), torch.nn.Tanh(), torch.nn.Linear(16, (dim - 1) * site.params_per_dim)
    )
    coupling = Coupling(site, net, split=1).double()
    x = torch.randn(6, dim, dtype=torch.float64) * 0.4  # mostly inside the splines' intervals
    cond = torch.randn(6, cond_dim, dtype=torch.float64)
    with torch.no_grad():
        out, logdet = coupling(x, cond)
    assert torch.equal(out[:, :1], x[:, :1])
    for i in range(len(x)):
        jac = torch.autograd.functional.jacobian(lambda v: coupling(v[None], cond[i : i + 1])[0][0], x[i])
        sign, exact = torch.linalg.slogdet(jac)
        assert sign > 0  # monotone sites, x_a untouched: orientation preserved
        assert float(logdet[i]) == pytest.approx(float(exact), rel=1e-9, abs=1e-9)
    with torch.no_grad():
        back, logdet_rev = coupling(out, cond, reverse=True)
    assert torch.allclose(back, x, rtol=0, atol=1e-12)
    assert torch.allclose(logdet_rev, -logdet, rtol=1e-9, atol=1e-9)


# -- hypothesis properties over conditioner outputs in [-20, 20] ---------------------------------

finite = st.floats(-20, 20, allow_nan=False, allow_infinity=False)
inputs = st.one_of(st.floats(-1e3, 1e3, allow_nan=False), st.floats(-4, 4, allow_nan=False))


@st.composite
def site_case(draw, kind):
    """(h of one dimension, a few inputs, which knot to snap one input onto: -1 = none)."""
    site = site_of(kind)
    h = draw(st.lists(finite, min_size=site.params_per_dim, max_size=site.params_per_dim))
    xs = draw(st.lists(inputs, min_size=1, max_size=6))
    snap = draw(st.integers(-1, site.bins if isinstance(site, RQSpline) else 2)) if kind_is_spline(site) else -1
    return h, xs, snap


def _case_tensors(site, case):
    h, xs, snap = case
    x = torch.tensor(xs, dtype=torch.float64)[:, None]
    hh = torch.tensor(h, dtype=torch.float64)[None].expand(len(xs), -1)
    if snap >= 0:
        x[0, 0] = site._knots(x, hh)[0][0, 0, snap]
    return x, hh


@pytest.mark.parametrize("kind", SITES)
def test_property_round_trip(kind):
    site = site_of(kind)
    eps = torch.finfo(torch.float64).eps

    @PROPERTY
    @given(site_case(kind))
    def check(case):
        x, h = _case_tensors(site, case)
        y, _ = site(x, h)
        back, _ = site(y, h, reverse=True)
        assert torch.isfinite(y).all() and torch.isfinite(back).all()
        # 1e-9 relative, times the conditioning: y = c(x) is rounded at eps·max(|x|, |h|) and the
        # inverse amplifies that by 1/c' (taken at both ends, c' may vary fast near a steep knot)
        cond = torch.maximum(1 / site.derivative(x, h), 1 / site.derivative(back, h)).clamp_min(1)
        scale = torch.maximum(x.abs(), h.abs().amax(1, keepdim=True)).clamp_min(1)
        err = (back - x).abs()
        assert (err <= 1e-9 * scale * cond + 64 * eps * scale).all(), (err.max(), cond.max())

    check()


@pytest.mark.parametrize("kind", SITES)
def test_property_monotone(kind):
    site = site_of(kind)

    @PROPERTY
    @given(site_case(kind))
    def check(case):
        x, h = _case_tensors(site, case)
        x, _ = x.sort(0)
        d = site.derivative(x, h)
        assert torch.isfinite(d).all() and (d > 0).all()
        y, ladj = site(x, h)
        assert (y.diff(dim=0) >= 0).all()  # non-decreasing in floating point, c' > 0 exactly
        assert torch.isfinite(ladj).all()

    check()


# -- kind-specific contracts ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_rq_spline_is_identity_outside_its_interval(dtype):
    site = RQSpline()
    b = torch.tensor(site.bound, dtype=dtype)
    big = torch.tensor(1e9, dtype=dtype)
    outside = torch.stack(
        [
            torch.nextafter(b, big),
            torch.nextafter(-b, -big),
            b + 0.5,
            -b - 0.5,
            torch.tensor(1e3, dtype=dtype),
            torch.tensor(-1e3, dtype=dtype),
        ]
    )[:, None]
    h = params(site, outside, 3.0, torch.Generator().manual_seed(5))
    for reverse in (False, True):
        out, ladj = site(outside, h, reverse=reverse)
        assert torch.equal(out, outside)
        assert torch.equal(ladj, torch.zeros_like(ladj))
    assert torch.equal(site.derivative(outside, h), torch.ones_like(outside))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_modified_spline_is_identity_plus_bias_outside(dtype):
    site = ModifiedRQSpline()
    b1, b2 = torch.tensor(site.b1, dtype=dtype), torch.tensor(site.b2, dtype=dtype)
    big = torch.tensor(1e9, dtype=dtype)
    outside = torch.stack(
        [
            torch.nextafter(b2, big),
            torch.nextafter(b1, -big),
            b2 + 0.5,
            b1 - 0.5,
            torch.tensor(1e3, dtype=dtype),
            torch.tensor(-1e3, dtype=dtype),
        ]
    )[:, None]
    h = params(site, outside, 3.0, torch.Generator().manual_seed(6))
    t = h[:, 3:4]  # per-dimension order: width, height, derivative logits, bias
    out, ladj = site(outside, h)
    assert torch.equal(out, outside + t)
    assert torch.equal(ladj, torch.zeros_like(ladj))
    back, ladj_rev = site(outside + t, h, reverse=True)
    assert torch.equal(back, outside + t - t)
    # (x + t) - t may round back onto B2, where c' = 1 up to an ulp: log c' within a few ulp of 0
    assert ladj_rev.abs().max() <= 4 * torch.finfo(dtype).eps
    assert torch.equal(site.derivative(outside, h), torch.ones_like(outside))


def test_zero_parameters_give_the_identity():
    x = torch.cat([torch.linspace(-0.6, 0.6, 241, dtype=torch.float64), torch.tensor([-0.5, 0.0, 0.5, 7.0])])[:, None]
    modified = ModifiedRQSpline()
    h = torch.zeros(len(x), 4, dtype=torch.float64)
    for reverse in (False, True):
        out, ladj = modified(x, h, reverse=reverse)
        assert (out - x).abs().max() <= 1e-15
        assert ladj.abs().max() <= 1e-15
    # the neural spline too (uniform bins, derivative 1), to a few ulp of |x| on [-B, B]
    rq = RQSpline()
    x = torch.linspace(-3.5, 3.5, 281, dtype=torch.float64)[:, None]
    h = torch.zeros(len(x), rq.params_per_dim, dtype=torch.float64)
    for reverse in (False, True):
        out, ladj = rq(x, h, reverse=reverse)
        assert ((out - x).abs() <= 4 * torch.finfo(torch.float64).eps * x.abs().clamp_min(1)).all()
        assert ladj.abs().max() <= 1e-15


EXTREME = torch.tensor(list(itertools.product([-50.0, 0.0, 50.0], repeat=4)))  # all 81 combinations


def _rq_extremes() -> torch.Tensor:
    site = RQSpline()
    rows = []
    for v in (-50.0, 50.0):
        for j in range(site.params_per_dim):
            r = torch.zeros(site.params_per_dim)
            r[j] = v
            rows.append(r)
    g = torch.Generator().manual_seed(7)
    rows += [torch.randint(0, 2, (site.params_per_dim,), generator=g) * 100.0 - 50 for _ in range(30)]
    return torch.stack(rows)


def _extremes(kind, dtype):
    site = site_of(kind)
    h = (EXTREME if kind == "modified-rq-spline" else _rq_extremes()).to(dtype)
    return site, h


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("kind", SPLINES)
def test_extreme_parameters_respect_minimum_bins_and_derivatives(kind, dtype):
    site, h = _extremes(kind, dtype)
    x = torch.zeros(len(h), 1, dtype=dtype)
    xk, yk, dk, _ = site._knots(x, h)
    if kind == "modified-rq-spline":
        min_width = min_height = min_derivative = site.eps
    else:
        min_width = min_height = 2 * site.bound * site.min_bin
        min_derivative = site.min_derivative
    rtol = 1e-9 if dtype == torch.float64 else 1e-4
    assert xk.diff(dim=-1).min() >= min_width * (1 - rtol)
    assert yk.diff(dim=-1).min() >= min_height * (1 - rtol)
    assert dk.min() >= min_derivative * (1 - rtol)
    assert torch.isfinite(dk).all()
    # the derivative the map actually has at each knot is the knot's
    for k in range(xk.shape[-1]):
        assert torch.allclose(site.derivative(xk[..., k], h), dk[..., k], rtol=1e-4)


def _edges(site, xk, dtype):
    lo, hi = interval(site)
    n = xk.shape[0]
    points = [xk[..., k] for k in range(xk.shape[-1])]
    big = torch.tensor(1e9, dtype=dtype)
    for b in (torch.tensor(lo, dtype=dtype), torch.tensor(hi, dtype=dtype)):
        for p in (b, torch.nextafter(b, big), torch.nextafter(b, -big)):
            points.append(p.expand(n, 1))
    points += [torch.zeros(n, 1, dtype=dtype), torch.full((n, 1), 1e3, dtype=dtype)]
    return points


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("kind", SPLINES)
def test_extreme_parameters_stay_finite_on_the_edges(kind, dtype):
    """Values, log-derivatives and the gradients of the forward (training) pass, at ±B, next to it, on the knots."""
    site, h = _extremes(kind, dtype)
    xk = site._knots(torch.zeros(len(h), 1, dtype=dtype), h)[0]
    for x in _edges(site, xk, dtype):
        xg, hg = x.clone().requires_grad_(True), h.clone().requires_grad_(True)
        y, ladj = site(xg, hg)
        back, ladj_rev = site(y.detach(), h, reverse=True)
        for value in (y, ladj, back, ladj_rev, site.derivative(x, h)):
            assert torch.isfinite(value).all()
        (y.sum() + ladj.sum()).backward()
        assert torch.isfinite(xg.grad).all() and torch.isfinite(hg.grad).all()


@pytest.mark.parametrize(
    "kind, dtype",
    [
        ("rq-spline", torch.float64),
        ("rq-spline", torch.float32),  # passes: softplus keeps the rq-spline's knot derivatives near 50 at most
        ("modified-rq-spline", torch.float64),
        ("modified-rq-spline", torch.float32),
    ],
    ids=["rq-float64", "rq-float32", "modified-float64", "modified-float32"],
)
def test_extreme_parameters_inverse_gradients_finite(kind, dtype):
    """The reverse (sampling) pass's gradients at the y-knots (bias included), at ±B and next to it."""
    site, h = _extremes(kind, dtype)
    _, yk, _, t = site._knots(torch.zeros(len(h), 1, dtype=dtype), h)
    for y in _edges(site, yk + t[..., None], dtype):
        yg, hg = y.clone().requires_grad_(True), h.clone().requires_grad_(True)
        back, ladj_rev = site(yg, hg, reverse=True)
        (back.sum() + ladj_rev.sum()).backward()
        assert torch.isfinite(yg.grad).all() and torch.isfinite(hg.grad).all()


# Well-conditioned round trips (c'(x) ≥ 1, so the exact inverse is at most as sensitive as x itself)
# that a naive quadratic solve gets wrong (it cancels); the stable solve must get them right.
_RQ_H = torch.zeros(23)
_RQ_H[3], _RQ_H[8 + 3], _RQ_H[16 + 3] = 20.0, -20.0, 20.0  # a wide, flat bin 3 whose right knot has d ≈ 20
INVERSE_CASES = [
    # kind, dtype, h, x (None: the interior knot), c'(x)
    ("modified-rq-spline", torch.float32, [0.0, -15.0, 12.0, 0.0], 0.5, 1.0),  # x = B2 exactly: got 0.49801
    (
        "modified-rq-spline",
        torch.float32,
        [2.582368850708008, 10.830577850341797, 18.575218200683594, 14.944267272949219],
        0.4288187026977539,
        5.33,
    ),  # got -0.5
    ("modified-rq-spline", torch.float64, [-50.0, -50.0, 50.0, 50.0], None, 5.2e21),  # x = interior knot: got -0.5
    ("rq-spline", torch.float32, _RQ_H.tolist(), 2.9754, 2.07),  # got 2.97343
]


@pytest.mark.parametrize(
    "kind, dtype, h, x, slope", INVERSE_CASES, ids=["mod-f32-B2", "mod-f32-inner", "mod-f64-knot", "rq-f32"]
)
def test_inverse_accurate_where_well_conditioned(kind, dtype, h, x, slope):
    site = site_of(kind)
    h = torch.tensor([h], dtype=dtype)
    x = site._knots(torch.zeros(1, 1, dtype=dtype), h)[0][..., 1] if x is None else torch.tensor([[x]], dtype=dtype)
    assert float(site.derivative(x.double(), h.double())) >= min(1.0, slope)  # well conditioned, as claimed
    back, _ = site(site(x, h)[0], h, reverse=True)
    tol = 1e-5 if dtype == torch.float32 else 1e-9
    assert float((back - x).abs().max()) <= tol * max(1.0, float(h.abs().max()))


@pytest.mark.parametrize("kind", SITES)
def test_tail_derivatives_lie_within_the_declared_tail_bounds(kind):
    """Remark 2's (s_l, s_u) from ``tail_bounds`` hold for c' at large |x| over wide conditioner outputs."""
    site = site_of(kind)
    low, high = site.tail_bounds()
    gen = torch.Generator().manual_seed(10)
    x = torch.tensor([-1e3, -50.0, 50.0, 1e3], dtype=torch.float64).repeat(50)[:, None]
    h = params(site, x, 8.0, gen)
    d = site.derivative(x, h)
    assert (d >= low * (1 - 1e-12)).all() and (d <= high * (1 + 1e-12)).all()
    if low == high:  # identity-like tails: exactly that slope
        assert torch.equal(d, torch.full_like(d, low))


def test_affine_scales_stay_in_their_intervals():
    raw = torch.linspace(-20, 20, 401, dtype=torch.float64)[:, None]
    extreme = torch.tensor([[-1e4], [-100.0], [100.0], [1e4]], dtype=torch.float64)
    for site, low, high in ((Affine(), 1e-4, 1 + 1e-4), (AffineBounded(), 0.1, 1.1)):
        assert torch.equal(site.scale(raw), torch.sigmoid(raw + 2) + low)  # SRFlow's sigmoid(raw + 2) + eps
        h = torch.cat([torch.zeros_like(raw), raw], 1)  # cross layout: shift 0::2, raw scale 1::2
        s = site.derivative(torch.zeros_like(raw), h)
        assert (s > low).all() and (s < high).all()  # open interval in float64 on [-20, 20]
        for dtype in (torch.float64, torch.float32):
            r = torch.cat([raw, extreme]).to(dtype)
            s = site.scale(r)
            # closed in floating point: sigmoid rounds to 0 and 1 far out
            assert (s >= torch.tensor(low, dtype=dtype)).all() and (s <= torch.tensor(high, dtype=dtype)).all()
            assert float(s.min()) == pytest.approx(low) and float(s.max()) == pytest.approx(high)
            # c' is that scale (derivative goes through exp(log s): equal to |log s|·eps)
            c = site.derivative(torch.zeros_like(r), torch.cat([torch.zeros_like(r), r], 1))
            assert torch.allclose(c, s, rtol=32 * torch.finfo(dtype).eps, atol=0)


def test_prior_site_maps_to_standardised_noise():
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    mean, logs = (
        torch.randn(5, 3, generator=gen, dtype=torch.float64),
        torch.randn(5, 3, generator=gen, dtype=torch.float64),
    )
    h = torch.stack([mean, logs], 2).reshape(5, 6)  # cross: mean 0::2, log σ 1::2
    eps, ladj = GaussianPrior()(x, h)
    assert torch.allclose(eps, (x - mean) / logs.exp())
    assert torch.allclose(ladj, -logs)
    _, gain = GaussianPrior()(eps, h, reverse=True)
    assert torch.allclose(gain.exp(), logs.exp())  # the inverse gain while sampling is σ


# -- the modified spline's closed form against the general implementation ------------------------
# ModifiedRQSpline evaluates its two bins in closed form (one comparison picks the bin) with a
# hand-written backward for training; _SplineWithTails._spline is the general path (bin search
# over _knots, rational_quadratic, tails by torch.where) that the closed form must reproduce.


def _general(site, inp, h, inverse=False):
    from flowaudit.reference_models.couplings import _SplineWithTails

    return _SplineWithTails._spline(site, inp, h, inverse)


def _closed_form_cases(dtype):
    """(x, h): random h at three scales plus the 81 extreme combinations; x random, on every knot,
    on B1 / B2 and the floats next to them, far out, ±inf and NaN."""
    site = ModifiedRQSpline()
    gen = torch.Generator().manual_seed(11)
    cases = []
    for scale in (0.5, 3.0, 20.0, None):
        h = (EXTREME.double() if scale is None else scale * torch.randn(81, 4, generator=gen, dtype=torch.float64)).to(
            dtype
        )
        xk, yk, _, t = site._knots(torch.zeros(len(h), 1, dtype=dtype), h)
        b1, b2, big = (torch.tensor(v, dtype=dtype) for v in (site.b1, site.b2, 1e9))
        edges = [
            b1,
            b2,
            torch.nextafter(b1, big),
            torch.nextafter(b1, -big),
            torch.nextafter(b2, big),
            torch.nextafter(b2, -big),
        ]
        columns = (
            [xk[..., k] for k in range(3)] + [yk[..., k] + t for k in range(3)] + [e.expand(len(h), 1) for e in edges]
        )
        columns += [
            torch.empty(len(h), 1, dtype=torch.float64).uniform_(-0.6, 0.6, generator=gen).to(dtype),
            (3 * torch.randn(len(h), 1, generator=gen, dtype=torch.float64)).to(dtype),
            torch.full((len(h), 1), 1e3, dtype=dtype),
            torch.full((len(h), 1), -math.inf, dtype=dtype),
            torch.full((len(h), 1), math.inf, dtype=dtype),
            torch.full((len(h), 1), math.nan, dtype=dtype),
        ]
        for x in columns:
            cases.append((x, h))
    return site, cases


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_modified_spline_closed_form_equals_general_spline(dtype):
    """Values: forward value and log c' and the inverse's value equal bit for bit; the inverse's
    log-det is -log c' at the point it returns, as the general path computes it, up to rounding
    (it takes the solve's bin, which differs only where that point rounds onto the other side
    of a knot, where c' is continuous)."""
    site, cases = _closed_form_cases(dtype)
    ulp = torch.finfo(dtype).eps
    for x, h in cases:
        out, ladj = site(x, h)
        ref_out, ref_ladj = _general(site, x, h)
        assert torch.equal(out.nan_to_num(7.0), ref_out.nan_to_num(7.0))
        assert torch.equal(ladj, ref_ladj)  # 0 on the tails, also for ±inf and NaN inputs
        assert torch.equal(site.log_derivative(x, h), ref_ladj)
        back, ladj_rev = site(x, h, reverse=True)
        assert torch.equal(back.nan_to_num(7.0), _general(site, x, h, inverse=True)[0].nan_to_num(7.0))
        ref_rev = -_general(site, back, h)[1]
        assert torch.isfinite(ladj_rev).all()
        assert ((ladj_rev - ref_rev).abs() <= 64 * ulp * ref_rev.abs().clamp_min(1)).all()


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_modified_spline_gradients_equal_general_spline(reverse):
    """float64 gradients of value and log-det with respect to the input and to h (the training
    step's hand-written backward; the reverse pass's autograd) against autograd through the
    general path."""
    site = ModifiedRQSpline()
    gen = torch.Generator().manual_seed(12)
    # random points, inside and on the tails, not on a knot: there the two paths may take different
    # one-sided derivatives (the general clamp's minimum / maximum split a tie's gradient in half,
    # and log c' has a kink at the interior knot)
    h = torch.cat([scale * torch.randn(200, 4, generator=gen, dtype=torch.float64) for scale in (0.5, 3.0, 20.0)])
    x = torch.cat(
        [
            torch.empty(300, 1, dtype=torch.float64).uniform_(-0.6, 0.6, generator=gen),
            3 * torch.randn(300, 1, generator=gen, dtype=torch.float64),
        ]
    )
    wa, wb = (
        torch.randn(x.shape, generator=gen, dtype=torch.float64),
        torch.randn(x.shape, generator=gen, dtype=torch.float64),
    )

    def grads(fn):
        xg, hg = x.clone().requires_grad_(True), h.clone().requires_grad_(True)
        out, ladj = fn(xg, hg)
        return torch.autograd.grad((out * wa).sum() + (ladj * wb).sum(), (xg, hg))

    if reverse:

        def general(y, hh):
            back = _general(site, y, hh, inverse=True)[0]
            return back, -_general(site, back, hh)[1]
    else:

        def general(xx, hh):
            return _general(site, xx, hh)

    got, want = grads(lambda a, b: site(a, b, reverse=reverse)), grads(general)
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        # at most the inputs' conditioning: h up to 20 makes c' up to 1e3 and 1/c' as large
        assert torch.allclose(g, w, rtol=1e-9, atol=1e-9 * float(w.abs().max()))


def test_modified_spline_gradcheck_and_paths_agree():
    """gradcheck / gradgradcheck on both passes; the autograd path (requires_grad) returns the
    values of the no-grad path bit for bit."""
    site = ModifiedRQSpline()
    gen = torch.Generator().manual_seed(13)
    x = 0.4 * torch.randn(3, 2, 3, generator=gen, dtype=torch.float64)
    x[0, 0, 0] = 3.0  # a tail point
    h = torch.randn(3, 8, 3, generator=gen, dtype=torch.float64)
    for reverse in (False, True):
        assert torch.autograd.gradcheck(
            lambda a, b: site(a, b, reverse=reverse), (x.clone().requires_grad_(True), h.clone().requires_grad_(True))
        )
        assert torch.autograd.gradgradcheck(
            lambda a, b: site(a, b, reverse=reverse)[0],
            (x.clone().requires_grad_(True), h.clone().requires_grad_(True)),
        )
        with torch.no_grad():
            plain = site(x, h, reverse=reverse)
        tracked = site(x.clone().requires_grad_(True), h.clone().requires_grad_(True), reverse=reverse)
        for a, b in zip(plain, tracked):
            assert torch.equal(a, b.detach())


def test_modified_spline_jacobians_under_vmap_and_torch_func():
    """The hand-written backward under vmap (jacobian(vectorize=True), where one incoming gradient
    may be batched and the other a plain zero) and the torch.func path (plain autograd) agree with
    the loop-over-rows Jacobian."""
    site = ModifiedRQSpline()
    gen = torch.Generator().manual_seed(14)
    x = 0.4 * torch.randn(2, 2, 3, generator=gen, dtype=torch.float64)
    x[0, 0, 0] = 2.0  # a tail point
    h = 3 * torch.randn(2, 8, 3, generator=gen, dtype=torch.float64)
    for k in (0, 1):  # value, log-det
        for wrt in ("x", "h"):
            fn = (lambda a: site(a, h)[k]) if wrt == "x" else (lambda b: site(x, b)[k])
            at = x if wrt == "x" else h
            loop = torch.autograd.functional.jacobian(fn, at)
            assert torch.allclose(
                torch.autograd.functional.jacobian(fn, at, vectorize=True), loop, rtol=1e-12, atol=1e-14
            )
            assert torch.allclose(torch.func.jacrev(fn)(at), loop, rtol=1e-12, atol=1e-14)
