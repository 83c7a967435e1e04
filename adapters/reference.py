"""Adapter for the bundled reference flows (toy, SR, low-light).

Their sites are the :class:`~flowaudit.reference_models.couplings.Elementwise` modules, called as
``out, ladj = site(inp, h, reverse=...)``: on the inverse pass ``exp(ladj)`` is the inverse gain
``1/c'`` at the visited point and ``h`` the conditioner's parameters there. A wrapped ``forward`` per
site and traced layer reads both. No bundled flow writes in place a tensor these wrappers see
(``tensors_stay_intact``), so a pass's reports are held and made in bursts (:class:`~.hooks.HeldReports`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ..reference_models import ReferenceFlow
from ..reference_models.couplings import Elementwise
from .base import Adapter, Observer, Site, keeps_graph, log_gain_reporter
from .bounds import LayerBound, reference_layers
from .hooks import HeldReports, first_tensor, wrapped
from .speedups import HookedSpeedUps

__all__ = ["ElementwiseSite", "ReferenceAdapter", "matches", "make"]

PROBE_SIZE = 8  # smallest condition side the probes draw at (NCSR's encoder needs LR ≥ 8)


class ElementwiseSite(Site):
    """A site that is an :class:`Elementwise` module; params are its ``h`` tensors."""

    batched_probe = True  # elementwise maps of their parameters: every probe value in one call
    spatial_params = True  # h is (B, C·P, *S), elementwise over S: a window over S is an h of its own

    def __init__(self, name: str, module: Elementwise):
        self.name, self.module, self.kind = name, module, module.kind

    def input_shape(self, params: Tensor) -> tuple[int, ...]:
        return (params.shape[0], params.shape[1] // self.module.params_per_dim, *params.shape[2:])

    def derivative(self, x: Tensor, params: Tensor) -> Tensor:
        return self.module.derivative(x, params)

    @property
    def derivative_constant(self) -> bool:
        """The bundled affine, additive and prior maps: c' is read off their parameters alone."""
        return bool(getattr(self.module, "derivative_constant", False))

    def map(self, x: Tensor, params: Tensor) -> Tensor:
        return self.module(x, params)[0]

    def tail_bounds(self) -> tuple[float, float]:
        return self.module.tail_bounds()

    def tail_start(self) -> float | None:
        """Where the tails begin in ``x`` (data side, where ``c'`` is probed), read from the live module.

        ``rq-spline``: its ``bound`` B (bins on [−B, B]); ``modified-rq-spline``: max(|B₁|, |B₂|) — the
        bias t shifts the output (the tails begin at |y| > max|Bᵢ| + |t| on the latent side) but not
        where ``c'(x)`` leaves 1, so it does not enter; ``affine``, ``affine-bounded``, ``additive``
        and ``prior``: 0, their ``c'`` does not depend on x, every |x| is a tail; anything else: unknown.
        """
        m = self.module
        if self.kind == "rq-spline":
            return float(m.bound)
        if self.kind == "modified-rq-spline":
            return max(abs(float(m.b1)), abs(float(m.b2)))
        if self.kind in ("affine", "affine-bounded", "additive", "prior"):
            return 0.0
        return None

    def visited(self, args: tuple, kwargs: dict, output: Any) -> tuple[Tensor, Tensor] | None:
        """(``ladj``, params) of a hooked reverse call as the model made them, ``None`` for a forward call."""
        reverse = kwargs.get("reverse", args[2] if len(args) > 2 else False)
        if not reverse:
            return None
        return output[1], args[1] if len(args) > 1 else kwargs["h"]


class ReferenceAdapter(HookedSpeedUps, Adapter):
    """Adapter of a :class:`ReferenceFlow`."""

    family = "reference"
    tensors_stay_intact = True  # no bundled flow writes a hooked tensor in place (tests/test_held_reports.py)

    def __init__(self, model: ReferenceFlow, name: str | None = None):
        super().__init__(model, name)
        self.task = model.task
        self.scale = int(model.config.get("scale", 1))
        self._sites = [ElementwiseSite(n, m) for n, m in model.named_modules() if isinstance(m, Elementwise)]
        self._called: set[str] | None = None  # the sites one sampling pass calls (read on first use)

    @property
    def condition_shape(self) -> tuple[int, ...]:
        return tuple(self.model.condition_shape)

    def check_condition_shape(self, shape: tuple[int, ...]) -> None:
        """Image flows squeeze ×2 at each of their ``L`` levels: a sample H·scale × W·scale must divide by 2^L."""
        super().check_condition_shape(shape)
        levels = getattr(self.model, "L", None)
        if len(shape) != 3 or levels is None:
            return
        h, w = shape[1] * self.scale, shape[2] * self.scale
        step = 2**levels
        if h % step or w % step:
            need = step // math.gcd(step, self.scale)
            sizes = (
                f"an LR size {shape[1]}×{shape[2]} (×{self.scale} = {h}×{w})"
                if self.scale > 1
                else f"a size {shape[1]}×{shape[2]}"
            )
            raise ValueError(
                f"{sizes} does not divide by the model's 2^L = {step} squeeze; crop the images to multiples of {need}"
            )

    @property
    def probe_shape(self) -> tuple[int, ...]:
        """Images: the smallest size from :data:`PROBE_SIZE` up that the squeezes take (at most the training
        size). Every pixel is a visited point, and a released SR flow costs ~25× less at 8×8 than at 40×40."""
        shape = self.condition_shape
        if len(shape) != 3:
            return shape
        step = 2 ** getattr(self.model, "L", 0)
        need = step // math.gcd(step, self.scale)
        size = -(-PROBE_SIZE // need) * need
        return (shape[0], min(size, shape[1]), min(size, shape[2]))

    def sites(self) -> list[Site]:
        """The elementwise modules that sampling calls: a sub-network the inverse never runs (an official
        checkpoint's unused branch) is no part of it, so no site."""
        if self._called is None:
            self._called = self._sampling_calls()
        return [s for s in self._sites if s.name in self._called]

    def _sampling_calls(self) -> set[str]:
        """Names of the site modules one seeded inverse pass at the model's condition shape calls (all of them
        when that pass cannot run: the class reading then stands). Global RNG, modes and weights are untouched."""
        called: set[str] = set()
        p = next(iter(self.model.parameters()), None)
        dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
        g, training = torch.Generator().manual_seed(0), self.model.training
        self.model.eval()  # no running statistic of the model moves
        try:
            y = torch.rand((1, *self.probe_shape), generator=g, dtype=torch.float64).to(dtype).to(self.device)
            with torch.no_grad():
                latents = [z.to(self.device) for z in self.sample_latents(y.cpu(), 0.9, g)]
                with wrapped(self.model, [s.name for s in self._sites], lambda n, *_: called.add(n)):
                    self.model.reverse(latents, y)
        except Exception:  # noqa: BLE001 - a model that cannot sample alone keeps every site
            return {s.name for s in self._sites}
        finally:
            self.model.train(training)
        return called

    def encoder(self) -> nn.Module | None:
        return self.model.encoder_module()

    def feature_layers(self) -> list[str]:
        return self.model.default_feature_layers()

    def encode(self, y: Tensor) -> None:
        self.model.encode(y)

    def layer_names(self) -> list[str]:
        return self.model.trace_layers()

    def inverse_layers(self) -> list[LayerBound] | None:
        """Every layer of the inverse pass with its bound (:func:`~.bounds.reference_layers`)."""
        return reference_layers(self.model, {id(s.module): s.name for s in self._sites})

    def latent_shapes(self, y: Tensor) -> list[tuple[int, ...]]:
        return [tuple(s[1:]) for s in self.model.latent_shapes(y)]

    def sample(self, y: Tensor, latents: list[Tensor], observer: Observer | None = None) -> Tensor:
        if observer is None:
            return self.model.reverse(latents, y)
        return self._observed(observer, lambda: self.model.reverse(latents, y))

    @contextlib.contextmanager
    def _hooks(self, observer: Observer, live: list[bool]) -> Iterator[HeldReports | None]:
        """The hooks of every site and traced layer, reporting to ``observer`` while ``live[0]``; held for the
        pass's end (its gains' ``exp`` too) unless the observer keeps the graph."""
        visited = {s.name: s.visited for s in self._sites}
        keep = keeps_graph(observer)
        later = HeldReports() if self.tensors_stay_intact and not keep else None
        report_site = log_gain_reporter(observer)  # exp(ladj): the inverse gain at the visited point

        def report_layer(name, x, _):
            observer.layer(name, x)

        def on_site(name, args, kwargs, output):
            got = visited[name](args, kwargs, output) if live[0] else None
            if got is not None and (later is None or not later.hold(report_site, name, *got)):
                ladj, h = got  # reported now: detached unless the observer differentiates through the gain (the attack)
                report_site(name, ladj if keep else ladj.detach(), h.detach())

        def on_layer(name, args, kwargs, output):
            if live[0]:
                x = first_tensor(output)
                if later is None or not later.hold(report_layer, name, x):
                    observer.layer(name, x.detach())

        with wrapped(self.model, list(visited), on_site), wrapped(self.model, self.layer_names(), on_layer):
            yield later

    def forward(self, x: Tensor, y: Tensor) -> tuple[list[Tensor], Tensor]:
        return self.model(x, y)

    def log_prob(self, x: Tensor, y: Tensor) -> Tensor:
        return self.model.log_prob(x, y)


def matches(model: Any) -> bool:
    return isinstance(model, ReferenceFlow)


def make(model: ReferenceFlow, name: str | None = None) -> ReferenceAdapter:
    return ReferenceAdapter(model, name)
