"""The contract between the audit engine and a conditional flow.

An :class:`Adapter` must answer five things for one model: the shape of a condition, the conditional
elementwise *sites*, latents at temperature τ, the inverse pass ``x = f⁻¹(z; y)`` and the forward pass
``z = f(x; y)``. Everything else has a default. Speed-ups (an observing block, reports held to a pass's
end) are optional and live apart, in :mod:`.speedups`.

While sampling the engine hands the adapter an :class:`Observer`; the adapter reports every layer's
output and every site's inverse gain to it (or its log, :func:`log_gain_reporter`), removes whatever it installed
and restores ``training``.
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor, nn

__all__ = [
    "Observer",
    "keeps_graph",
    "log_gain_reporter",
    "Site",
    "UnknownSite",
    "PriorSite",
    "Adapter",
    "widen",
    "AFFINE_BOUNDED_FLOOR",
    "AFFINE_KINDS",
    "affine_kind",
    "elementwise_derivative",
    "sweep_bounds",
    "fill",
    "repeat_rows",
    "standard_normal_log_prob",
    "draw_latents",
    "plain_latent_shapes",
]


class Observer(Protocol):
    """What the engine listens to during an inverse pass.

    An observer with a true ``keep_graph`` attribute (the attack's) gets gains still attached to the
    autograd graph; every other observer gets them detached (read it with :func:`keeps_graph`).
    """

    def layer(self, name: str, x: Tensor) -> None:
        """Output ``x`` (batch first) of layer ``name`` of the inverse pass."""

    def site(self, name: str, gain: Tensor, params: Any) -> None:
        """Inverse gain ``1/c'`` (batch first) of site ``name`` at the visited points, and its parameters there."""


def keeps_graph(observer: Observer | None) -> bool:
    """Whether ``observer`` asks for gains still attached to the autograd graph."""
    return bool(getattr(observer, "keep_graph", False))


def log_gain_reporter(observer: Observer) -> Callable[[str, Tensor, Any], None]:
    """What reports a site's inverse gain given its log ``ln(1/c')`` (the log-determinant terms a model has
    already), bound once for ``observer``: its ``site_log`` where it has one (the tracer, which bins logs as they
    are, sparing an ``exp`` over the call), else a call of ``site`` with the ``exp``."""
    site_log = getattr(observer, "site_log", None)
    if site_log is not None:
        return site_log

    def site_of_exp(name: str, log_gain: Tensor, params: Any) -> None:
        observer.site(name, log_gain.exp(), params)

    return site_of_exp


# -- probe helpers --------------------------------------------------------------------------------


def repeat_rows(t: Tensor | tuple | list, v: int) -> Tensor | tuple | list:
    """``t`` (B, ...) stacked ``v`` times along the batch: (v·B, ...); each tensor of a tuple or list alike."""
    if isinstance(t, (tuple, list)):
        return type(t)(repeat_rows(u, v) for u in t)
    return t.unsqueeze(0).expand(v, *t.shape).reshape(v * t.shape[0], *t.shape[1:])


def fill(values: Tensor, shape: tuple[int, ...]) -> Tensor:
    """(V·B, ...) inputs, block ``k`` filled with ``values[k]``; ``shape`` is (B, ...)."""
    v = values.reshape(-1, *([1] * len(shape)))
    return v.expand(len(values), *shape).reshape(len(values) * shape[0], *shape[1:])


def elementwise_derivative(fn: Callable[[Tensor], Tensor], x: Tensor, forward: bool = False) -> Tensor:
    """``c'(x)`` of an elementwise map ``fn`` at every entry of ``x``; works under ``no_grad``.

    The Jacobian is diagonal, so the gradient of ``Σ fn(x)`` is ``c'`` entry by entry: one eager backward
    pass (kept on the graph when gradients are on, for the attack). Forward mode (a JVP with a tangent of
    ones) gives the same diagonal but runs many maps through decompositions and imports the compiler on its
    first call, seconds of fixed cost; it is used with ``forward`` (a map evaluated in float32 whose
    derivative must be the JVP's to the last bits) and for a map that cannot be run backwards.
    """
    graph = torch.is_grad_enabled()
    try:
        if forward:
            return _jvp(fn, x)
        with torch.enable_grad():
            u = x if graph and x.requires_grad else x.detach().requires_grad_()
            out = fn(u)
            if not out.requires_grad:  # the map does not depend on x (or on anything that needs a gradient)
                return torch.zeros_like(out)
            (d,) = torch.autograd.grad(out, u, torch.ones_like(out), create_graph=graph, allow_unused=True)
        return torch.zeros_like(out) if d is None else d
    except RuntimeError:  # inference tensors, a Function without a backward: forward mode
        return _jvp(fn, x)


def _jvp(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """One forward-mode JVP of ``fn`` at ``x`` with a tangent of ones."""
    from torch.func import jvp

    return jvp(fn, (x,), (torch.ones_like(x),))[1]


class Site(ABC):
    """One conditional elementwise map ``c(x; θ)`` (a coupling, an injector, a conditional prior).

    A subclass gives the elementwise math, :meth:`map` and/or :meth:`derivative` (default: the JVP of
    :meth:`map`), and :meth:`input_shape`; the probe methods :meth:`derivative_at` / :meth:`map_at`
    fill every probe value into that shape at the parameters the observer kept.
    """

    name: str
    kind: str
    #: probe all values in one call (values filled block by block) rather than one call per value
    batched_probe: bool = False
    #: c' does not depend on x (the map is affine in x), so the tail probe needs it at a few values only; set only
    #: where the map is affine by construction (c' in closed form, or a library's own affine map), and checked by
    #: the probe (:func:`flowaudit.evidence.probe._constant`)
    derivative_constant: bool = False
    #: params (B, …, H, W) act elementwise over the trailing two dims (a feature map's positions), so a window
    #: over H, W of them is itself a params tensor: the engine may keep windows of rows too large for its budget
    spatial_params: bool = False

    def map(self, x: Tensor, params: Any) -> Tensor:
        """``c(x; params)``, elementwise."""
        raise NotImplementedError(f"{type(self).__name__} does not evaluate its map")

    def derivative(self, x: Tensor, params: Any) -> Tensor:
        """``c'(x; params)``, elementwise."""
        return elementwise_derivative(lambda u: self.map(u, params), x)

    def input_shape(self, params: Any) -> tuple[int, ...]:
        """Shape (B, ...) of the inputs ``x`` the site maps for ``params``."""
        raise NotImplementedError(f"{type(self).__name__} does not say its input shape")

    def probe_dtype(self, values: Tensor) -> torch.dtype:
        """dtype the map is evaluated in (a library module with float32 weights needs its own)."""
        return values.dtype

    def probe_params(self, params: Any, dtype: torch.dtype) -> Any:
        """The kept parameters as :meth:`map` takes them."""
        return params.to(dtype)

    def probe(self, values: Tensor, params: Any, fn: Callable[[Tensor, Any], Tensor]) -> Tensor:
        """``fn(x, params)`` with every element of ``x`` set to each probe value: (V, M)."""
        dtype, given = self.probe_dtype(values), values.dtype
        shape = self.input_shape(params)
        p = self.probe_params(params, dtype)
        values = values.to(dtype)
        if self.batched_probe:
            out = fn(fill(values, shape), repeat_rows(p, len(values))).reshape(len(values), -1)
        else:
            ones = torch.ones(shape, dtype=dtype, device=params.device)
            out = torch.stack([fn(ones * v, p).flatten() for v in values])
        return out.to(given)

    def derivative_at(self, values: Tensor, params: Any) -> Tensor:
        """``c'(v)`` for every probe value ``v`` (V,) at every point of ``params``: (V, M)."""
        return self.probe(values, params, self.derivative)

    def map_at(self, values: Tensor, params: Any) -> Tensor:
        """``c(v)`` itself, same shapes as :meth:`derivative_at` (its JVP equals the derivative)."""
        return self.probe(values, params, self.map)

    def tail_bounds(self) -> tuple[float, float] | None:
        """Bounds of ``c'`` for large ``|x|`` that the site's kind allows, when known."""
        return None

    def tail_start(self) -> float | None:
        """``|x|`` beyond which the map is in its tails (a spline's bound), when known."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, kind={self.kind!r})"


class UnknownSite(Site):
    """A conditional part of a class the adapter does not know: reported, never probed."""

    kind = "unknown"

    def __init__(self, name: str, cls: str):
        self.name, self.cls = name, cls

    def derivative_at(self, values: Tensor, params: Any) -> Tensor:
        raise NotImplementedError(f"{self.cls} is of a class the adapter does not know: its derivative is unknown")


class PriorSite(Site):
    r"""A condition-dependent diagonal-normal base: :math:`c(z) = (z - \mu)\,e^{-\log\sigma}`, inverse gain
    :math:`\sigma`; params = ``stack([μ, log σ], 1)``, (B, 2, *event)."""

    kind = "prior"
    derivative_constant = True

    def __init__(self, name: str):
        self.name = name

    def derivative_at(self, values: Tensor, params: Tensor) -> Tensor:
        p = params.to(values.dtype)
        return torch.exp(-p[:, 1]).flatten()[None].expand(values.shape[0], -1)

    def map_at(self, values: Tensor, params: Tensor) -> Tensor:
        p = params.to(values.dtype)
        return (values[:, None] - p[:, 0].flatten()[None]) * torch.exp(-p[:, 1]).flatten()[None]

    def tail_start(self) -> float | None:
        return 0.0  # affine: every |x| is in the tails


# -- kinds and bounds -----------------------------------------------------------------------------


def widen(band: tuple[float, float], factor: float = 0.5) -> tuple[float, float]:
    """Widen a valid range by ``factor`` of its width on each side ([0, 1] → [-0.5, 1.5], paper S1.1)."""
    lo, hi = band
    pad = factor * (hi - lo)
    return lo - pad, hi + pad


#: An affine scale whose floor is at least this caps the inverse gain at 1/floor ≤ 100: ``affine-bounded``
#: (FS-NCSR†'s 0.1, FrEIA's soft clamp); a lower floor (Glow/SRFlow's 1e-4, nflows' 1e-3) is ``affine``.
AFFINE_BOUNDED_FLOOR = 1e-2


#: The kinds of a map affine in x, whose c' is the same at every x (:attr:`Site.derivative_constant`).
AFFINE_KINDS = ("affine", "affine-bounded", "additive")


def affine_kind(low: float) -> str:
    """Kind of an affine site whose scale ``c' = s`` never goes below ``low`` (read from the live object)."""
    return "affine-bounded" if low >= AFFINE_BOUNDED_FLOOR else "affine"


def sweep_bounds(derivative: Callable[[Tensor], Tensor]) -> tuple[float, float]:
    """Bounds of an affine site's ``c'`` over all raw parameters, read from the live object.

    ``derivative(u)`` returns ``c'`` for raw conditioner outputs all equal to ``u[k]`` (rows k), for
    ``u = ±logspace(-2, 4)`` and 0. A bound still moving by more than 2× between ``|u| = 10³`` and
    ``10⁴`` has none: ``0`` or ``inf`` (softplus/exp scales).
    """
    u = torch.logspace(-2, 4, 61, dtype=torch.float64)
    u = torch.cat([-u.flip(0), torch.zeros(1, dtype=torch.float64), u])
    d = derivative(u).reshape(len(u), -1).to(torch.float64)
    lo, hi = d.amin(1), d.amax(1)
    inner = slice(10, len(u) - 10)  # |u| ≤ 10³
    lo_in, hi_in = float(lo[inner].min()), float(hi[inner].max())
    low, high = float(lo.min()), float(hi.max())
    if low < lo_in / 2:
        low = 0.0
    if high > 2 * hi_in:
        high = math.inf
    return low, high


# -- latents --------------------------------------------------------------------------------------


def draw_latents(
    shapes: list[tuple[int, ...]], y: Tensor, temperature: float, generator: torch.Generator | None
) -> list[Tensor]:
    """τ·ε, one standard-normal ε (B, *shape) per latent shape, in ``y``'s dtype and on its device.

    With a generator ε is drawn on the CPU, so a seed gives the same latents on every device.
    """
    device = y.device if generator is None else "cpu"
    return [
        temperature * torch.randn((y.shape[0], *s), generator=generator, dtype=y.dtype, device=device).to(y.device)
        for s in shapes
    ]


def plain_latent_shapes(adapter: Any, y: Tensor) -> list[tuple[int, ...]] | None:
    """``adapter``'s :meth:`Adapter.latent_shapes` for ``y`` where its latents are the base class's ``τ·ε`` draw of
    them (its class keeps :meth:`Adapter.sample_latents`), else ``None``: then only its ``sample_latents`` says
    what they are."""
    if getattr(type(adapter), "sample_latents", None) is not Adapter.sample_latents:
        return None
    return adapter.latent_shapes(y)


def standard_normal_log_prob(latents: list[Tensor]) -> Tensor:
    """``Σ log N(z; 0, I)`` over every latent, per input (B,)."""
    return sum(-0.5 * (z.flatten(1) ** 2 + math.log(2 * math.pi)).sum(1) for z in latents)


# -- the adapter ----------------------------------------------------------------------------------


class Adapter(ABC):
    """What the engine asks of one model; one subclass per model family.

    Attributes:
        model: the wrapped ``nn.Module``.
        name: a display name for reports.
        family: the adapter's name (``reference``, ``freia``, …).
        task: ``toy``, ``sr``, ``lowlight`` or ``generic`` (SR adds LR-PSNR).
        scale: SR factor (``task == "sr"`` only).
    """

    family: str = "generic"
    task: str = "generic"
    scale: int = 1

    def __init__(self, model: nn.Module, name: str | None = None):
        self.model = model
        self.name = name or getattr(model, "name", None) or type(model).__name__

    # -- required -------------------------------------------------------------------------------
    @property
    @abstractmethod
    def condition_shape(self) -> tuple[int, ...]:
        """Shape of one condition ``y``, no batch axis."""

    @abstractmethod
    def sites(self) -> list[Site]:
        """The conditional elementwise sites, in forward (encode) order; may be empty (see :meth:`coverage`)."""

    def sample_latents(self, y: Tensor, temperature: float, generator: torch.Generator | None) -> list[Tensor]:
        """Latents for conditions ``y`` at temperature τ: ``τ·ε``, a standard-normal ε of each of
        :meth:`latent_shapes` drawn in turn from ``generator`` (:func:`draw_latents`). An adapter whose latents
        are drawn otherwise overrides this (and its :meth:`latent_shapes` then says nothing)."""
        shapes = self.latent_shapes(y)
        if shapes is None:
            raise NotImplementedError(f"{type(self).__name__} gives neither latent_shapes nor sample_latents")
        return draw_latents(shapes, y, temperature, generator)

    @abstractmethod
    def sample(self, y: Tensor, latents: list[Tensor], observer: Observer | None = None) -> Tensor:
        """The inverse pass ``x = f⁻¹(z; y)``, reporting to ``observer`` when given."""

    @abstractmethod
    def forward(self, x: Tensor, y: Tensor) -> tuple[list[Tensor], Tensor]:
        """The forward pass ``z = f(x; y)``: ``(latents, logdet)``."""

    # -- with defaults --------------------------------------------------------------------------
    def latent_shapes(self, y: Tensor) -> list[tuple[int, ...]] | None:
        """Shapes of one row's latents for conditions ``y`` (no batch axis; they follow ``y``'s shape, not its
        values), drawn as :meth:`sample_latents` draws them; ``None``: not stated (the adapter draws its own)."""
        return None

    def log_prob(self, x: Tensor, y: Tensor) -> Tensor:
        """``log q(x | y)`` per input (B,): standard-normal latents plus the forward log-det."""
        latents, logdet = self.forward(x, y)
        return standard_normal_log_prob(latents) + logdet

    def layer_names(self) -> list[str]:
        """Names of the inverse pass's layers, in the order :meth:`sample` reports them."""
        return []

    def inverse_layers(self) -> list[Any] | None:
        """Every layer of the inverse pass, in the order sampling runs it, each with its ∞-norm bound
        (:class:`~flowaudit.adapters.bounds.LayerBound`); ``None`` when the adapter cannot list them (then no
        whole-inverse certificate is issued)."""
        return None

    def inverse_layers_ordered(self) -> bool:
        """Whether :meth:`inverse_layers` lists the layers in the order sampling runs them (else the
        certificate composes them in an order-free way)."""
        return True

    def check_condition_shape(self, shape: tuple[int, ...]) -> None:
        """Raise ``ValueError`` (one line) when conditions of ``shape`` (no batch axis) cannot be sampled.

        Default: the model's :attr:`condition_shape`, or for images (C, H, W) any size with its channels.
        """
        want, got = tuple(self.condition_shape), tuple(shape)
        if got != want and not (len(got) == len(want) == 3 and got[0] == want[0]):
            raise ValueError(f"conditions have shape {got}, the model expects {want}")

    @property
    def probe_shape(self) -> tuple[int, ...]:
        """The condition shape the probes draw at when no data is given (inspect, the condition sweep).

        Drawn conditions carry no content, so their size only sets the cost; an adapter that knows which
        image sizes its model takes gives a small one here. Default: :attr:`condition_shape`.
        """
        return tuple(self.condition_shape)

    @property
    def output_range(self) -> tuple[float, float]:
        """Valid range of a sample's values: the model's ``output_range`` attribute, else [0, 1]."""
        return tuple(getattr(self.model, "output_range", (0.0, 1.0)))

    @property
    def error_band(self) -> tuple[float, float]:
        """Values outside this band count as pixel errors (the valid range widened, S1.1)."""
        return widen(self.output_range)

    def unread(self) -> list[str]:
        """Parts of the model that may be conditional but that no site reads, by name."""
        return []

    def coverage(self) -> dict:
        """What the adapter saw of the model's sites, for the report (an audit that saw nothing must not look
        clean): ``{"n_sites", "complete", "reason"}``, JSON-ready."""
        n = len(self.sites())
        if not n:
            return {
                "n_sites": 0,
                "complete": False,
                "reason": f"no sites found: the {self.family} adapter recognises no part of {self.name} as a "
                "conditional elementwise site (couplings of one's own code: declare them with "
                "flowaudit.adapters.custom)",
            }
        unread = self.unread()
        if unread:
            return {"n_sites": n, "complete": False, "reason": f"parts not read as sites: {', '.join(unread)}"}
        return {"n_sites": n, "complete": True, "reason": None}

    def encoder(self) -> nn.Module | None:
        """The conditioning network ``g_θ``; ``None`` when the condition itself is the feature."""
        return None

    def feature_layers(self) -> list[str]:
        """Default module names (of :attr:`model`) hooked for ``s_OOD``; empty = the condition itself."""
        return []

    def encode(self, y: Tensor) -> None:
        """Run the conditioning encoder on ``y`` (so feature hooks fire)."""

    def describe(self) -> dict[str, Any]:
        """What the adapter read or assumed about the model, merged into the report's ``model`` entry."""
        return {}

    def fingerprint(self) -> str:
        """SHA-256 of the weights (names, shapes, dtypes and values), 16 hex digits."""
        digest = hashlib.sha256()
        for key, value in sorted(self.model.state_dict().items()):
            digest.update(key.encode())
            if isinstance(value, Tensor):
                t = value.detach().cpu().contiguous()
                digest.update(f"{tuple(t.shape)}{t.dtype}".encode())
                digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return digest.hexdigest()[:16]

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def device(self) -> torch.device:
        p = next(iter(self.model.parameters()), None)
        return p.device if p is not None else torch.device("cpu")
