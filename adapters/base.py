"""The one contract between the audit engine and a conditional flow.

An :class:`Adapter` answers, for one model: where the conditioning encoder
is and which of its modules are hooked for ``s_OOD`` by default; which parts
are the conditional elementwise *sites* and of what kind; how to get a
site's derivative ``c'``; how to draw latents, sample ``x = f⁻¹(z; y)`` and
run forward; the valid output range; and a fingerprint of the weights.

The engine never reaches into a model by itself. While sampling it hands the
adapter an :class:`Observer`; the adapter reports every layer's output and
every site's inverse gain to it, by hooks where the model calls its modules
(the bundled flows, FrEIA) or by driving the inverse pass itself where the
library bypasses them (nflows calls ``inverse`` directly, zuko rebuilds its
transforms for every condition, normflows names the directions the other way
round). Whatever the adapter does, it removes what it installed and restores
the model's ``training`` flag.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from .hooks import HeldReports

__all__ = [
    "Observer",
    "keeps_graph",
    "Site",
    "Adapter",
    "widen",
    "AFFINE_BOUNDED_FLOOR",
    "affine_kind",
    "elementwise_derivative",
    "sweep_bounds",
]


class Observer(Protocol):
    """What the engine listens to during an inverse pass (the adapter calls it).

    An observer with a true ``keep_graph`` attribute (the worst-case attack's) asks for the
    gains as computed, still attached to the autograd graph, so an objective built from them
    can be differentiated w.r.t. the condition; every other observer (the scan's) gets them
    detached and no graph is kept. Read it with :func:`keeps_graph`. An adapter that cannot
    pass attached gains passes detached ones; the attack then says it cannot differentiate.
    """

    def layer(self, name: str, x: Tensor) -> None:
        """Output ``x`` (batch first) of layer ``name`` of the inverse pass."""

    def site(self, name: str, gain: Tensor, params: Any) -> None:
        """Inverse gain ``1/c'`` (batch first) at the visited points of site ``name``, and the
        site's parameters there (for the Remark 2 probe; passed to :meth:`Site.derivative_at`)."""


class Site(ABC):
    """One conditional elementwise map (a coupling, an injector, a conditional prior)."""

    name: str
    kind: str

    @abstractmethod
    def derivative_at(self, values: Tensor, params: Any) -> Tensor:
        """``c'(v)`` for every probe value ``v`` (shape (V,)) at every point of ``params``.

        Returns shape (V, M) where M counts the (batch × element) points ``params``
        describe. This is how the Remark 2 probe evaluates tails under the
        conditions actually met while sampling.
        """

    def map_at(self, values: Tensor, params: Any) -> Tensor:
        """``c(v)`` itself, same shapes as :meth:`derivative_at` (its JVP must equal the derivative)."""
        raise NotImplementedError(f"{type(self).__name__} does not evaluate its map")

    def tail_bounds(self) -> tuple[float, float] | None:
        """Bounds of ``c'`` for large ``|x|`` that the site's kind allows, when known."""
        return None

    def tail_start(self) -> float | None:
        """``|x|`` beyond which the map is in its tails, when the structure says (a spline's bound B,
        read from the live object); ``None`` when unknown. The Remark 2 probe starts well past it."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, kind={self.kind!r})"


def keeps_graph(observer: Observer | None) -> bool:
    """Whether ``observer`` asks for gains still attached to the autograd graph (see :class:`Observer`)."""
    return bool(getattr(observer, "keep_graph", False))


def widen(band: tuple[float, float], factor: float = 0.5) -> tuple[float, float]:
    """Widen a valid range by ``factor`` of its width on each side ([0, 1] → [-0.5, 1.5], paper S1.1)."""
    lo, hi = band
    pad = factor * (hi - lo)
    return lo - pad, hi + pad


#: An affine scale whose floor is at least this caps the inverse gain at 1/floor ≤ 100: ``affine-bounded``
#: (FS-NCSR†'s 0.1, FrEIA's soft clamp); a lower floor (Glow/SRFlow's 1e-4, nflows' 1e-3) is ``affine``.
AFFINE_BOUNDED_FLOOR = 1e-2


def affine_kind(low: float) -> str:
    """Kind of an affine site whose scale ``c' = s`` never goes below ``low`` (read from the live object)."""
    return "affine-bounded" if low >= AFFINE_BOUNDED_FLOOR else "affine"


def sweep_bounds(derivative: Callable[[Tensor], Tensor]) -> tuple[float, float]:
    """Bounds of an affine site's ``c'`` over all raw parameters, read from the live object.

    ``derivative(u)`` returns ``c'`` for raw conditioner outputs all equal to ``u[k]`` (rows k),
    for ``u = ±logspace(-2, 4)`` and 0. A bound still moving by more than 2× between
    ``|u| = 10³`` and ``10⁴`` has none: ``0`` or ``inf`` (softplus/exp scales).
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


def elementwise_derivative(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """``c'(x)`` of an elementwise map ``fn`` at every entry of ``x``, by one forward-mode JVP.

    The Jacobian of an elementwise map is diagonal, so the JVP with a tangent of ones is its
    diagonal. Works under ``no_grad`` (forward-mode AD does not need the autograd graph).
    """
    from torch.func import jvp

    return jvp(fn, (x,), (torch.ones_like(x),))[1]


class Adapter(ABC):
    """Base class of all adapters; one subclass per model family (see module docstring).

    Attributes:
        model: the wrapped ``nn.Module``.
        name: a display name for reports.
        family: the adapter's name (``reference``, ``freia``, …).
        task: ``toy``, ``sr``, ``lowlight`` or ``generic`` (SR adds LR-PSNR).
        condition_shape: shape of one condition ``y``, no batch axis.
        output_range: valid range of a sample's values.
        scale: SR factor (``task == "sr"`` only).
        tensors_stay_intact: whether every tensor an observed pass's hooks see keeps its values until the
            pass returns (no in-place write of the model reaches it), so that the adapter may hold its
            reports for then (:class:`~flowaudit.adapters.hooks.HeldReports`). Claimed only where the code
            of the whole pass is known: the bundled flows (tested on each).
    """

    family: str = "generic"
    task: str = "generic"
    scale: int = 1
    tensors_stay_intact: bool = False

    def __init__(self, model: nn.Module, name: str | None = None):
        self.model = model
        self.name = name or getattr(model, "name", None) or type(model).__name__

    # -- what the model is ------------------------------------------------------
    @property
    @abstractmethod
    def condition_shape(self) -> tuple[int, ...]: ...

    def check_condition_shape(self, shape: tuple[int, ...]) -> None:
        """Raise ``ValueError`` (one line) when conditions of ``shape`` (no batch axis) cannot be sampled.

        Checked before any sampling, so a wrong size is the user's one-line error and not a crash deep
        inside the flow. Default: the model's :attr:`condition_shape`, or for images (C, H, W) any size
        with its channel count; adapters whose structure constrains H and W (squeezes) say more.
        """
        want, got = tuple(self.condition_shape), tuple(shape)
        if got != want and not (len(got) == len(want) == 3 and got[0] == want[0]):
            raise ValueError(f"conditions have shape {got}, the model expects {want}")

    @property
    def output_range(self) -> tuple[float, float]:
        """The valid range of a sample's values: the model's ``output_range`` attribute when it has one
        (libraries know nothing of data ranges; a user may state one on the model), else [0, 1]."""
        return tuple(getattr(self.model, "output_range", (0.0, 1.0)))

    @property
    def error_band(self) -> tuple[float, float]:
        """Values outside this band count as pixel errors (the valid range widened, S1.1)."""
        return widen(self.output_range)

    @abstractmethod
    def sites(self) -> list[Site]:
        """The conditional elementwise sites, in forward (encode) order; may be empty (see :meth:`coverage`)."""

    def unread(self) -> list[str]:
        """Parts of the model that may be conditional but that no site reads (code the adapter does not
        know): names for the report. Empty by default."""
        return []

    def coverage(self) -> dict:
        """What the adapter saw of the model's sites, for the report: an audit that saw nothing must not look clean.

        ``{"n_sites": int, "complete": bool, "reason": str | None}``: ``complete`` is false and
        ``reason`` one line starting ``"no sites found: "`` when :meth:`sites` is empty, or naming the
        parts no site reads (:meth:`unread`): a partial view. JSON-ready.
        """
        n = len(self.sites())
        if not n:
            return {
                "n_sites": 0,
                "complete": False,
                "reason": f"no sites found: the {self.family} adapter recognises no part of {self.name} as a conditional "
                "elementwise site (couplings of one's own code: declare them with flowaudit.adapters.custom)",
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

    def fingerprint(self) -> str:
        """SHA-256 of the weights (names, shapes, dtypes and values), 16 hex digits."""
        digest = hashlib.sha256()
        for key, value in sorted(self.model.state_dict().items()):
            digest.update(key.encode())
            if isinstance(value, Tensor):
                t = value.detach().cpu().contiguous()
                digest.update(f"{tuple(t.shape)}{t.dtype}".encode())
                digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return digest.hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        """What the adapter read or assumed about the model, merged into the report's ``model`` entry
        (an official checkpoint's inferred configuration, for example); empty by default."""
        return {}

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def device(self) -> torch.device:
        p = next(iter(self.model.parameters()), None)
        return p.device if p is not None else torch.device("cpu")

    # -- what the model does ----------------------------------------------------
    @abstractmethod
    def sample_latents(self, y: Tensor, temperature: float, generator: torch.Generator | None) -> list[Tensor]:
        """Latents for conditions ``y`` at temperature τ (τ scales the standard-normal ε)."""

    @abstractmethod
    def sample(self, y: Tensor, latents: list[Tensor], observer: Observer | None = None) -> Tensor:
        """The inverse pass ``x = f⁻¹(z; y)``, reporting to ``observer`` when given."""

    @contextlib.contextmanager
    def observing(self, observer: Observer) -> Iterator[None]:
        """A block of :meth:`sample` calls that report to ``observer``: an adapter whose reporting has a
        set-up cost a call (forward hooks to register and remove) may pay it once for the block. Calls
        with no observer or another one see nothing of it; everything is removed when the block ends.
        By default nothing is held."""
        yield

    @abstractmethod
    def forward(self, x: Tensor, y: Tensor) -> tuple[list[Tensor], Tensor]:
        """The forward pass ``z = f(x; y)``: ``(latents, logdet)``."""

    @abstractmethod
    def log_prob(self, x: Tensor, y: Tensor) -> Tensor:
        """``log q(x | y)`` per input, (B,)."""

    def layer_names(self) -> list[str]:
        """Names of the inverse pass's layers, in the order :meth:`sample` reports them."""
        return []


class HookedAdapter(Adapter):
    """An adapter whose observed passes report through hooks (or wrapped methods): :meth:`_hooks` puts them on
    the model. A pass with an observer puts them on for itself; an :meth:`observing` block puts them on once
    for all its passes, and they report only the passes that name the block's observer (``live``). Hooks
    that hold a pass's reports (:class:`~flowaudit.adapters.hooks.HeldReports`) have them made when it returns."""

    _held: tuple[Observer, list[bool], HeldReports | None] | None = (
        None  # an observing block's observer, whether a pass of it runs, its held reports
    )

    @abstractmethod
    def _hooks(self, observer: Observer, live: list[bool]) -> contextlib.AbstractContextManager[HeldReports | None]:
        """The hooks of an observed pass, reporting to ``observer`` while ``live[0]``; removed on exit. The
        context's value: the reports they hold for the end of each pass, or ``None``."""

    def _observed(self, observer: Observer, run: Callable[[], Tensor]) -> Tensor:
        """``run()``, an inverse pass, reporting to ``observer``: through the block's hooks if it is the block's."""
        held = self._held
        if held is not None and held[0] is observer:
            return _reported(run, held[1], held[2])
        with self._hooks(observer, [True]) as later:
            return _reported(run, [True], later)

    @contextlib.contextmanager
    def observing(self, observer: Observer) -> Iterator[None]:
        """Hooks put on once for the block; they report only :meth:`sample` calls that name ``observer``."""
        if self._held is not None:  # already holding one: calls with this observer hook themselves
            yield
            return
        live = [False]
        with self._hooks(observer, live) as later:
            self._held = (observer, live, later)
            try:
                yield
            finally:
                self._held = None


def _reported(run: Callable[[], Tensor], live: list[bool], later: HeldReports | None) -> Tensor:
    """``run()`` with the hooks live, then the reports they held (dropped if it raised)."""
    live[0] = True
    try:
        out = run()
    except BaseException:
        if later is not None:
            later.drop()
        raise
    finally:
        live[0] = False
    if later is not None:
        later.flush()
    return out
