r"""Sites found from where the condition flows, whatever the module's class.

A layer of a library flow that no adapter knows by class may still be a conditional elementwise site: a
custom gate, a condition-dependent scale outside any coupling. It is found by the data flow, not by name:
with its input :math:`x` held, its encode-direction output :math:`c(x; y)` is evaluated under several
conditions (:func:`depends_on_condition`); an output that changes is conditional. A conditional map is a
site when it is elementwise: one JVP with a random tangent :math:`v` equals :math:`v` times the JVP with
ones (:func:`is_elementwise`, exact for a diagonal Jacobian). Only layers that sampling calls are tested,
so a sub-network the inverse never runs is never a site.

A found site (:class:`FlowLayerSite`) evaluates :math:`c` through the layer's own call, with the
condition the layer received as its parameters, and :math:`c'` by a JVP of that call; under an observer
that keeps the graph the gain stays attached, so the attack differentiates through it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .base import Site

__all__ = ["FlowLayerSite", "found_site", "probe_inputs", "depends_on_condition", "is_elementwise", "jvp_derivative"]
__all__ += ["condition_variants"]

Map = Callable[[Tensor, Tensor], Tensor]  # (x, condition) -> c(x; condition), batch first


def jvp_derivative(fn: Callable[[Tensor], Tensor], x: Tensor, tangent: Tensor | None = None) -> Tensor:
    """The JVP of ``fn`` at ``x`` (tangent of ones by default): forward mode, else the double-backward trick
    for autograd functions without forward-mode support."""
    v = torch.ones_like(x) if tangent is None else tangent
    try:
        from torch.func import jvp

        return jvp(fn, (x,), (v,))[1]
    except (RuntimeError, NotImplementedError):
        with torch.enable_grad():
            return torch.autograd.functional.jvp(fn, x, v, create_graph=torch.is_grad_enabled())[1]


def condition_variants(y: Tensor) -> list[Tensor]:
    """Conditions that differ from ``y`` in every entry: shifted, reflected and scaled copies (a layer whose
    output ignores all of them does not read the condition)."""
    return [y + 1.0, -y - 0.5, 3.0 * y + 0.25]


def depends_on_condition(fn: Map, x: Tensor, conditions: list[Tensor]) -> bool:
    """Whether ``fn(x, c)`` changes over ``conditions`` with ``x`` held (NaN equal to NaN)."""
    with torch.no_grad():
        ref = fn(x, conditions[0])
        for c in conditions[1:]:
            out = fn(x, c)
            if out.shape != ref.shape:
                return True
            differ = (out != ref) & ~(torch.isnan(out) & torch.isnan(ref))
            if bool(differ.any()):
                return True
    return False


def is_elementwise(fn: Callable[[Tensor], Tensor], x: Tensor, seed: int = 0) -> bool:
    """Whether ``fn`` maps ``x`` elementwise: same shape, and its JVP along a random tangent ``v`` is ``v``
    times its JVP along ones (a Jacobian with off-diagonal entries breaks this for almost every ``v``)."""
    g = torch.Generator().manual_seed(seed)
    v = (torch.rand(x.shape, generator=g, dtype=torch.float64) + 0.5).to(x.dtype).to(x.device)
    try:
        with torch.no_grad():
            out = fn(x)
            if out.shape != x.shape:
                return False
            ones, along = jvp_derivative(fn, x), jvp_derivative(fn, x, v)
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    ok = torch.isfinite(ones) & torch.isfinite(along)
    if not bool(ok.any()):
        return False
    a, b = along[ok].double(), (ones * v)[ok].double()
    return bool(torch.allclose(a, b, rtol=1e-3, atol=1e-6 * max(1.0, float(b.abs().max()))))


def _dtype_of(module: nn.Module | None, default: torch.dtype) -> torch.dtype:
    p = next(iter(module.parameters()), None) if module is not None else None
    return p.dtype if p is not None and p.is_floating_point() else default


class FlowLayerSite(Site):
    r"""A layer found conditional and elementwise from the data flow: :math:`c(x; y)` is the layer's own
    encode-direction call, params are the condition it received (batch first), :math:`c'` a JVP."""

    kind = "unknown"
    batched_probe = True

    def __init__(self, name: str, module: nn.Module | None, encode: Map, decode: Map, event_shape: tuple[int, ...]):
        self.name, self.module = name, module
        self.encode, self.decode, self.event_shape = encode, decode, tuple(event_shape)

    def map(self, x: Tensor, params: Tensor) -> Tensor:
        return self.encode(x, params)

    def derivative(self, x: Tensor, params: Tensor) -> Tensor:
        return jvp_derivative(lambda u: self.encode(u, params), x)

    def input_shape(self, params: Tensor) -> tuple[int, ...]:
        return (params.shape[0], *self.event_shape)

    def probe_dtype(self, values: Tensor) -> torch.dtype:
        return _dtype_of(self.module, values.dtype)

    def read(self, x_out: Tensor, condition: Tensor) -> tuple[Tensor, Tensor]:
        """``(inverse gain, params)`` at the layer's sample-side output ``x_out`` (its encode-side input)."""
        return 1.0 / self.derivative(x_out, condition), condition

    def inverse(self, x: Tensor, condition: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The layer's own inverse of ``x``: ``(output, inverse gain, params)``."""
        out = self.decode(x, condition)
        return (out, *self.read(out, condition))


def found_site(
    name: str, module: nn.Module | None, encode: Map, decode: Map, x_out: Tensor, condition: Tensor
) -> FlowLayerSite | bool:
    """What the data flow says of one layer at its sample-side output ``x_out`` under ``condition``: a
    :class:`FlowLayerSite` (conditional and elementwise), ``True`` (conditional, not elementwise: a part no
    site reads) or ``False`` (its output does not depend on the condition)."""
    x_out = x_out.detach()
    if not depends_on_condition(encode, x_out, [condition, *condition_variants(condition)]):
        return False
    if not is_elementwise(lambda u: encode(u, condition), x_out):
        return True
    return FlowLayerSite(name, module, encode, decode, tuple(x_out.shape[1:]))


def probe_inputs(model: nn.Module, shapes: list[tuple[int, ...]], n: int = 4) -> list[Tensor]:
    """Seeded standard-normal inputs, one (n, *shape) per shape, in the model's dtype and on its device: the
    conditions and latents of the one pass that finds sites from the data flow."""
    g = torch.Generator().manual_seed(0)
    p = next(iter(model.parameters()), None)
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    device = p.device if p is not None else torch.device("cpu")
    return [torch.randn((n, *s), generator=g, dtype=torch.float64).to(dtype).to(device) for s in shapes]
