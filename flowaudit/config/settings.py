"""The settings of one audit run, parsed and checked once where the run is asked for.

The CLI and the Python API both build one :class:`Settings`; everything downstream (the
sampling loop, the shards, the attack) receives it already parsed: the device resolved to a
:class:`torch.device`, the attack budget a :class:`~flowaudit.config.budget.Budget`, the
temperature checked. Where a run keeps its shards and which ranks share it is the run's
:class:`~flowaudit.runs.runner.Context`, not a setting.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import AuditError
from .budget import Budget, parse_budget
from .device import resolve_device
from .sampling import Sampling

__all__ = ["OBJECTIVES", "RULES", "Search", "Settings", "read_budget", "settings_from"]

OBJECTIVES = ("logdet", "max-gain", "max-abs")
RULES = ("sign", "adam")


def read_budget(value: str | Budget, option: str | None = None) -> Budget:
    """A budget as given (``linf:EPS``, ``l2:EPS``, ``box:LO,HI``, ``none``); a bad one names ``option``."""
    if isinstance(value, Budget):
        return value
    try:
        return parse_budget(value)
    except ValueError as exc:
        raise AuditError(f"{option}: {exc}" if option else str(exc)) from None


@dataclass(frozen=True)
class Search:
    """How the attack searches: budget, objective, steps, step size (``None``: the default rule)."""

    budget: Budget
    objective: str = "logdet"
    steps: int = 50
    step_size: float | None = None
    layer_factor: float = 10.0  # a layer blew up: max |value| ×10 over the start's and past 10× the error band
    rule: str = "adam"  # adam (Adam's direction m̂/√v̂) or sign (PGD)

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise AuditError(f"unknown objective {self.objective!r}: expected one of {', '.join(OBJECTIVES)}")
        if self.steps < 0:
            raise AuditError("--steps must be ≥ 0")
        if self.rule not in RULES:
            raise AuditError(f"unknown step rule {self.rule!r}: expected one of {', '.join(RULES)}")
        if self.step_size is not None and not self.step_size > 0:
            raise AuditError("--step-size must be > 0")


@dataclass(frozen=True)
class Settings:
    """What a run computes and where: K samples at τ, the device, passes, features, thresholds, the attack.

    ``device`` may be given as text (``auto``, ``cpu``, ``cuda:N``) and ``attack`` as a budget's text;
    both are parsed here, once. ``batch_size`` counts samples per inverse pass (``None``: sized from
    the memory budget); ``exact`` makes each pass one input's K samples (batch-invariant figures);
    ``None`` leaves it to the command: exact, except a scan of a small flow, whose passes hold a thousand
    inputs, sixteen passes a shard (:func:`~flowaudit.adapters.small_flow`). ``shard_inputs`` overrides the
    inputs a scan shard holds.
    """

    samples: int = 10
    temperature: float = 0.9
    seed: int = 0
    device: torch.device | str = "auto"
    batch_size: int | None = None
    exact: bool | None = None
    progress: bool = False
    layers: Sequence[str] | None = None
    pooling: str = "avg"
    estimator: str = "ledoit-wolf"
    remark2_threshold: float = 0.5
    explosion_threshold: float = 100.0
    attack: Search | Budget | str | None = None
    attack_starts: int | None = 16
    shard_inputs: int | None = None
    band: tuple[float, float] | None = None  # the error band in use (stats.risk.error_band); None: the adapter's
    threads: int | None = None  # torch's CPU threads during the run (None: config.threads.default_threads)
    sampling: Sampling = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise AuditError("--samples must be at least 1")
        if self.temperature < 0:
            raise AuditError("--temperature must be ≥ 0")
        if self.batch_size is not None and self.batch_size < 1:
            raise AuditError("--batch-size must be at least 1")
        if self.threads is not None and self.threads < 1:
            raise AuditError("--threads must be at least 1")
        if self.attack is not None and not isinstance(self.attack, Search):
            object.__setattr__(self, "attack", Search(read_budget(self.attack)))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "device", resolve_device(self.device))
        object.__setattr__(self, "sampling", Sampling(self.samples, self.temperature, self.seed))

    def replace(self, **changes: Any) -> Settings:
        """A copy with ``changes`` (parsed and checked like the original)."""
        return dataclasses.replace(self, **changes)

    @property
    def inputs_per_batch(self) -> int:
        """Inputs whose K samples fit in ``batch_size`` (at least one)."""
        return max(1, (self.batch_size or self.samples) // self.samples)

    @property
    def exact_passes(self) -> bool:
        """Whether each pass holds one input's K samples: ``exact`` unless it is ``False`` (``None`` means exact)."""
        return self.exact is not False

    @property
    def inputs_per_pass(self) -> int:
        """Inputs per inverse pass: one in exact mode, else as many as ``batch_size`` holds."""
        return 1 if self.exact_passes else self.inputs_per_batch


# the attack command's own keywords of the Python API, gathered into a :class:`Search`
_SEARCH_WORDS = ("objective", "steps", "step_size", "rule")


def settings_from(settings: Settings | None, options: Mapping[str, Any], **defaults: Any) -> Settings:
    """The run's settings from the API's keywords: ``settings`` (or the command's ``defaults``) with ``options``.

    ``attack`` is a budget with ``attack_steps`` steps (``scan``); ``budget``, ``objective``, ``steps``,
    ``step_size``, ``rule`` and ``starts`` are the ``attack`` command's words for the same :class:`Search`.
    """
    options = dict(options)
    words = {word: options.pop(word) for word in _SEARCH_WORDS if word in options}
    if "budget" in options or words:
        given = settings.attack.budget if settings is not None and settings.attack is not None else "none"
        options["attack"] = Search(read_budget(options.pop("budget", given)), **words)
    if "starts" in options:
        options["attack_starts"] = options.pop("starts")
    steps = options.pop("attack_steps", None)
    if options.get("attack") is not None and not isinstance(options["attack"], Search):
        options["attack"] = Search(read_budget(options["attack"]), **({} if steps is None else {"steps": steps}))
    unknown = sorted(set(options) - {f.name for f in dataclasses.fields(Settings) if f.init})
    if unknown:
        raise TypeError(f"unexpected keyword argument {unknown[0]!r}")
    if settings is None:
        return Settings(**{**defaults, **options})
    return settings.replace(**options) if options else settings
