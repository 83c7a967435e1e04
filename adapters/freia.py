r"""Adapter for FrEIA invertible networks (``SequenceINN``, ``GraphINN``) with the condition as ``c=[y]``.

Each active half of a coupling block is one site, mapped with parameters a subnetwork computes
from the other half and the condition:

.. math::

    c(x) = x \odot e^{s} + t,\qquad s = \alpha\, f(\hat s)\quad
    (\text{soft clamp: } f = 0.636\,\arctan,\ \tanh \text{ or } 2\,\sigma - 1),

so :math:`c' = e^{s}` and the inverse gain is :math:`e^{-s}`. A bounded :math:`f` keeps the scale in
:math:`[e^{-\alpha\sup|f|}, e^{\alpha\sup|f|}]`: ``affine-bounded`` (tail slopes that never meet).
NICE has :math:`s = 0` (``additive``); GIN centres :math:`s` over the half, which bounds one element's
scale by :math:`e^{\pm 2\alpha\sup|f|(n-1)/n}` (``additive`` for :math:`n = 1`). Clamp, activation,
splits and GIN are read from the live block; ``AllInOneBlock``'s coupling is evaluated through its own
``_affine``. A conditional block of unknown class is tested by where the condition flows
(:mod:`.dataflow`): conditional and elementwise, a site through its own call; conditional otherwise, an
``unknown`` site that, like any block whose Jacobian may vary and that no site reads, is named by
:meth:`~.base.Adapter.coverage`.

Sampling is FrEIA's own ``inn(z, c=[y], rev=True)``; forward hooks on the subnetworks and blocks read
parameters and layer outputs and are removed on exit.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from .base import Observer, Site, UnknownSite, affine_kind, keeps_graph
from .dataflow import FlowLayerSite, found_site, probe_inputs
from .hooks import first_tensor, hooked
from .library import LibraryAdapter
from .speedups import HookedSpeedUps

__all__ = ["AffineHalfSite", "FrEIAAdapter", "matches", "make"]


class AffineHalfSite(Site):
    r"""One active half of a FrEIA affine/additive coupling: :math:`c(x) = x e^{s} + t`.

    ``params`` is one tensor (B, 2, *half) holding :math:`[s, t]` at the visited points
    (after the block's clamp), so the Remark 2 probe sees exactly the scales met while sampling.
    """

    derivative_constant = True  # c' = e^s

    def __init__(
        self,
        name: str,
        kind: str,
        bounds: tuple[float, float] | None,
        roles: dict[str, str],
        to_params: Callable[[dict[str, Tensor]], Tensor],
    ):
        self.name, self.kind, self._bounds = name, kind, bounds
        self.roles = roles  # submodule name -> role ("a": [s, t] stacked, "s", "t")
        self._to_params = to_params
        self._pending: dict[str, Tensor] = {}

    @staticmethod
    def _split(values: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        p = params.to(values.dtype)
        return p[:, 0].reshape(1, -1), p[:, 1].reshape(1, -1)

    def derivative_at(self, values: Tensor, params: Tensor) -> Tensor:
        s, _ = self._split(values, params)
        return torch.exp(s).expand(values.shape[0], -1)

    def map_at(self, values: Tensor, params: Tensor) -> Tensor:
        s, t = self._split(values, params)
        return values[:, None] * torch.exp(s) + t

    def tail_bounds(self) -> tuple[float, float] | None:
        return self._bounds

    def tail_start(self) -> float | None:
        return 0.0  # affine everywhere: every |x| is in the tails

    def feed(self, module_name: str, output: Tensor, keep: bool = False) -> tuple[Tensor, Tensor] | None:
        """Take one subnetwork output; when all roles are in: (inverse gain, params), attached to the graph
        with ``keep`` (FrEIA's own log-det is not used: the gain is recomputed from the subnetwork's output)."""
        # clone: FrEIA scales some outputs in place after the call (AllInOneBlock: ``a *= 0.1``)
        self._pending[self.roles[module_name]] = (output if keep else output.detach()).clone()
        if len(self._pending) < len(set(self.roles.values())):
            return None
        pending, self._pending = self._pending, {}
        params = self._to_params(pending)
        return torch.exp(-params[:, 0]), params


# -- reading the blocks ---------------------------------------------------------

_BIG = 1e30  # a raw scale output far past any soft clamp's knee


def _extremes(slope: Callable[[Tensor], Tensor], n: int) -> tuple[str, tuple[float, float] | None]:
    """Kind and ``c'`` bounds of an affine half of ``n`` elements; ``slope(raw)`` maps raw scale outputs
    (rows, n) to ``c' = e^{s}`` as the block computes it. Rows ``[+B, −B, …]`` and ``[−B, +B, …]`` reach the
    extremes of every soft clamp, GIN's mean-centred one included (a uniform sweep would centre to 0)."""
    raw = torch.full((2, n), -_BIG, dtype=torch.float64)
    raw[0, 0], raw[1, :] = _BIG, _BIG
    raw[1, 0] = -_BIG
    with torch.no_grad():
        d = slope(raw)
    lo, hi = float(d.min()), float(d.max())
    if lo == hi == 1.0:
        return "additive", (1.0, 1.0)
    if not (math.isfinite(hi) and lo > 0):
        return "affine", None
    return affine_kind(lo), (lo, hi)


def _soft(block: nn.Module, gin: bool) -> Callable[[Tensor], Tensor]:
    """``ŝ ↦ s`` exactly as the block computes it (its own ``clamp`` and ``f_clamp``)."""

    def fn(raw: Tensor) -> Tensor:
        s = block.clamp * block.f_clamp(raw)
        return s - s.mean(1, keepdim=True) if gin else s

    return fn


def _stacked(soft: Callable[[Tensor], Tensor], n_s: int) -> Callable[[dict[str, Tensor]], Tensor]:
    """Params from one subnet output ``a = [ŝ, t]`` split after ``n_s`` channels."""
    return lambda p: torch.stack([soft(p["a"][:, :n_s]), p["a"][:, n_s:]], 1)


def _separate(soft: Callable[[Tensor], Tensor]) -> Callable[[dict[str, Tensor]], Tensor]:
    return lambda p: torch.stack([soft(p["s"]), p["t"]], 1)


def _additive(p: dict[str, Tensor]) -> Tensor:
    return torch.stack([torch.zeros_like(p["t"]), p["t"]], 1)


def _all_in_one(block: nn.Module) -> Callable[[dict[str, Tensor]], Tensor]:
    """[s, t] of AllInOneBlock's coupling through its own ``_affine``, affine in ``x``: ``t = c(0)`` and
    ``e^s = c(1) − c(0)`` (in float64, exact to ~1e-16 relative)."""

    def fn(p: dict[str, Tensor]) -> Tensor:
        a = p["a"].to(torch.float64)
        ch = a.shape[1] // 2
        zeros = a.new_zeros(a[:, :ch].shape)
        c0, _ = block._affine(zeros, a.clone())
        c1, _ = block._affine(zeros + 1, a.clone())
        return torch.stack([torch.log(c1 - c0), c0], 1).to(p["a"].dtype)

    return fn


def _block_sites(name: str, block: nn.Module) -> list[Site]:
    """The sites of one FrEIA block, in forward (encode) order."""
    import FrEIA.modules as Fm

    def sub(attr: str) -> str:
        return f"{name}.{attr}" if name else attr

    if isinstance(block, Fm.AllInOneBlock):
        spatial = tuple(block.dims_in[0][1:])
        n = block.splits[1] * int(torch.Size(spatial).numel())
        to_params = _all_in_one(block)

        def slope(raw: Tensor) -> Tensor:  # raw scale outputs (rows, n) as the subnet's (rows, 2·ch, *spatial)
            a = raw.reshape(raw.shape[0], block.splits[1], *spatial)
            return torch.exp(to_params({"a": torch.cat([a, torch.zeros_like(a)], 1)})[:, 0])

        kind, bounds = _extremes(slope, n)
        return [AffineHalfSite(sub("x2"), kind, bounds, {sub("subnet"): "a"}, to_params)]
    if isinstance(block, Fm.NICECouplingBlock):
        return [
            AffineHalfSite(sub("x1"), "additive", (1.0, 1.0), {sub("F"): "t"}, _additive),
            AffineHalfSite(sub("x2"), "additive", (1.0, 1.0), {sub("G"): "t"}, _additive),
        ]
    if not hasattr(block, "f_clamp"):
        return [UnknownSite(name, type(block).__name__)] if block.dims_c else []

    gin = isinstance(block, Fm.GINCouplingBlock)
    n1, n2 = block.split_len1, block.split_len2
    soft = _soft(block, gin)

    def half(label: str, n: int, roles: dict[str, str], to_params) -> AffineHalfSite:
        # channels of one half (GIN centres over channels, per pixel: the extremes are per pixel too)
        kind, bounds = _extremes(lambda raw: torch.exp(soft(raw)), n)
        return AffineHalfSite(sub(label), kind, bounds, roles, to_params)

    if isinstance(block, (Fm.GLOWCouplingBlock, Fm.GINCouplingBlock)):
        # coupling1 transforms x1 with subnet2([x2, c]); coupling2 transforms x2 with subnet1([y1, c])
        return [
            half("x1", n1, {sub("subnet2"): "a"}, _stacked(soft, n1)),
            half("x2", n2, {sub("subnet1"): "a"}, _stacked(soft, n2)),
        ]
    if isinstance(block, Fm.RNVPCouplingBlock):
        return [
            half("x1", n1, {sub("subnet_s2"): "s", sub("subnet_t2"): "t"}, _separate(soft)),
            half("x2", n2, {sub("subnet_s1"): "s", sub("subnet_t1"): "t"}, _separate(soft)),
        ]
    if isinstance(block, Fm.AffineCouplingOneSided):
        return [half("x2", n2, {sub("subnet"): "a"}, _stacked(soft, n2))]
    if isinstance(block, Fm.ConditionalAffineTransform):
        return [half("x", block.channels, {sub("subnet"): "a"}, _stacked(soft, block.channels))]
    return [UnknownSite(name, type(block).__name__)] if block.dims_c else []


# FrEIA blocks whose Jacobian does not depend on the input (permutations, fixed or learned linear maps,
# ActNorm, reshapes, splits): layers, never sites
_CONSTANT_JACOBIAN = frozenset(
    "PermuteRandom FixedLinearTransform Fixed1x1Conv IRevNetDownsampling IRevNetUpsampling HaarDownsampling "
    "HaarUpsampling Flatten Reshape Split Concat OrthogonalTransform HouseholderPerm ActNorm "
    "LearnedElementwiseScaling InvAutoFC InvAutoConv2D".split()
)


class FrEIAAdapter(HookedSpeedUps, LibraryAdapter):
    """Adapter of a FrEIA ``SequenceINN`` or ``GraphINN`` with one condition, standard-normal latents."""

    family = "freia"
    _base_in_layers = False  # latents are standard normal; ``_layers`` are the blocks

    def __init__(self, model: nn.Module, name: str | None = None):
        super().__init__(model, name)
        import FrEIA.framework as Ff

        modules = {id(m): n for n, m in model.named_modules()}
        if isinstance(model, Ff.SequenceINN):
            used = {c for c in model.conditions if c is not None}
            if used - {0}:
                raise TypeError(f"SequenceINN uses conditions {sorted(used)}: flowaudit passes one condition, c=[y]")
            self._blocks = [(modules[id(m)], m) for m in model.module_list]
            cond = next((m.dims_c[0] for m, c in zip(model.module_list, model.conditions) if c is not None), None)
            self._latent_shapes = [tuple(model.shapes[-1])]
        elif isinstance(model, Ff.GraphINN):
            if len(model.condition_nodes) > 1 or len(model.in_nodes) != 1:
                raise TypeError(
                    f"GraphINN with {len(model.in_nodes)} inputs and {len(model.condition_nodes)} "
                    "condition nodes: flowaudit needs one input and at most one condition"
                )
            self._blocks = [(modules[id(n.module)], n.module) for n in model.node_list if n.module is not None]
            cond = model.condition_nodes[0].dims if model.condition_nodes else None
            self._latent_shapes = [tuple(s) for s in model.global_out_shapes]
        else:
            raise TypeError(f"not a FrEIA SequenceINN/GraphINN: {type(model).__name__}")
        if cond is None:
            raise TypeError(f"{type(model).__name__} has no conditional block: nothing to audit")
        self._condition_shape = tuple(int(d) for d in cond)
        self._sites = [s for n, b in self._blocks for s in _block_sites(n, b)]
        self._find_from_data_flow()
        self._layers = [n for n, _ in reversed(self._blocks)]
        own = {n: [s for s in self._sites if s.name == n or s.name.startswith(f"{n}.")] for n, _ in self._blocks}
        self._unseen = self._unread_of([(n, own[n], type(b).__name__ in _CONSTANT_JACOBIAN) for n, b in self._blocks])

    def _find_from_data_flow(self) -> None:
        """Each conditional block of unknown class, tested at a seeded input of its own shape by where the
        condition flows (:mod:`.dataflow`): conditional and elementwise, a site; else it stays ``unknown``
        (conditional) or is dropped (its output ignores the condition)."""
        blocks = dict(self._blocks)
        kept: list[Site] = []
        for site in self._sites:
            block = blocks.get(site.name)
            if not isinstance(site, UnknownSite) or block is None or len(getattr(block, "dims_in", ())) != 1:
                kept.append(site)
                continue
            x, y = probe_inputs(self.model, [tuple(block.dims_in[0]), tuple(block.dims_c[0])])
            # the block's forward, not its __call__: its own layer hook must not fire inside its gain's JVP
            encode = lambda u, c, b=block: b.forward([u], c=[c], rev=False)[0][0]  # noqa: E731
            decode = lambda u, c, b=block: b.forward([u], c=[c], rev=True)[0][0]  # noqa: E731
            try:
                got = found_site(site.name, block, encode, decode, x, y)
            except Exception:  # noqa: BLE001 - a block that cannot run alone keeps its class reading
                got = True
            if got is not False:
                kept.append(got if isinstance(got, FlowLayerSite) else site)
        self._sites = kept

    def _read_condition_shape(self) -> tuple[int, ...]:
        return self._condition_shape

    def _run(self, inp: list[Tensor], y: Tensor, rev: bool) -> tuple[list[Tensor], Tensor]:
        out, logdet = self.model(inp[0] if len(inp) == 1 else tuple(inp), c=[y], rev=rev)
        if not isinstance(logdet, Tensor):  # volume-preserving blocks (NICE, GIN) return a plain 0.
            logdet = torch.full((y.shape[0],), float(logdet), dtype=inp[0].dtype, device=inp[0].device)
        return (list(out) if isinstance(out, (tuple, list)) else [out]), logdet

    def sample(self, y: Tensor, latents: list[Tensor], observer: Observer | None = None) -> Tensor:
        if observer is None:
            return self._run(latents, y, rev=True)[0][0]

        def run() -> Tensor:
            for s in self._sites:
                if isinstance(s, AffineHalfSite):
                    s._pending = {}
            return self._run(latents, y, rev=True)[0][0]

        return self._observed(observer, run)

    @contextlib.contextmanager
    def _hooks(self, observer: Observer, live: list[bool]) -> Iterator[None]:
        """Hooks on every site's subnetworks and every block, reporting to ``observer`` while ``live[0]``."""
        owner = {m: s for s in self._sites if isinstance(s, AffineHalfSite) for m in s.roles}
        keep = keeps_graph(observer)

        def on_subnet(name: str, args: tuple, kwargs: dict, output: Any) -> None:
            if live[0]:
                site = owner[name]
                got = site.feed(name, first_tensor(output), keep)
                if got is not None:
                    observer.site(site.name, *got)

        found = {s.name: s for s in self._sites if isinstance(s, FlowLayerSite)}

        def on_layer(name: str, args: tuple, kwargs: dict, output: Any) -> None:
            if live[0]:
                out = first_tensor(output)
                if name in found:  # a site found from the data flow: c' by a JVP through the block's own call
                    gain, params = found[name].read(out, kwargs["c"][0])
                    observer.site(name, *((gain, params) if keep else (gain.detach(), params.detach())))
                observer.layer(name, out.detach())

        with hooked(self.model, list(owner), on_subnet), hooked(self.model, self.layer_names(), on_layer):
            yield

    def forward(self, x: Tensor, y: Tensor) -> tuple[list[Tensor], Tensor]:
        return self._run([x], y, rev=False)


def matches(model: Any) -> bool:
    # cheap and import-free: the class (or a base, for user subclasses) is FrEIA's SequenceINN/GraphINN
    return any(
        c.__module__.split(".")[0] == "FrEIA" and c.__name__ in ("SequenceINN", "GraphINN") for c in type(model).__mro__
    )


def make(model: nn.Module, name: str | None = None) -> FrEIAAdapter:
    return FrEIAAdapter(model, name)
