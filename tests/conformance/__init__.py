"""Conformance cases: one small trained conditional flow per library and block, one format.

``tests/test_conformance.py`` collects ``CASES`` from every module of this
package (``reference.py``, ``freia.py``, ``normflows.py``, ``nflows.py``,
``zuko.py``, …) and runs the same checks on each through
``flowaudit.adapt(model)``.

Format of a case module::

    # tests/conformance/mylib.py
    from . import Case, fit_toy

    def _build() -> nn.Module:             # seeded, trained on the toy, < 2 s on one core
        torch.manual_seed(0)
        flow = ...                          # a conditional flow of the library, 2D x, 2D condition y
        return fit_toy(flow, lambda m, x, y: -lib_log_prob(m, x, y).mean())   # returns flow.eval()

    CASES = [
        Case(
            id="mylib-affine",              # pytest id: <library>-<block>
            requires="mylib",               # pytest.importorskip(requires) before anything else
            build=_build,
            expected_kinds=["affine-bounded", "affine-bounded"],   # site kinds, in adapter.sites() order
            library_sample=lambda m, y, latents: ...,   # x for these latents via the library's own API
            library_log_prob=lambda m, x, y: ...,       # (B,) via the library's own API
        ),
    ]

Import the library inside the functions, never at module level: collecting the cases must
work without it (``requires`` then skips them).

Field meanings (see :class:`Case`):

* ``latents`` given to ``library_sample`` are exactly what ``adapter.sample_latents(y, τ, g)``
  returned (a list of tensors, batch first); the case maps them onto the library's base sample
  (for a single standard-normal base that is ``latents[0]``).
* ``expected_verdicts`` defaults to the verdict each kind should get
  (:data:`VERDICT_OF_KIND`: bounded or unbounded affine scales violate; additive and
  RQ splines with identity tails comply; kinds not in the table, e.g. ``prior``, whose
  verdict is a measurement, are not asserted); give a list (``None`` = not asserted)
  only when a case differs.
* ``xfail`` maps a check name (``"verdict"``, ``"sample"``, ``"log_prob"``, …) to a reason:
  that single check is marked expected-to-fail (e.g. because the Remark 2 probe, not the
  adapter, is at fault). Use sparingly and say why.
* ``atol`` / ``rtol``: tolerances for comparing adapter and library (float32).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = ["Case", "VERDICT_OF_KIND", "fit_toy"]

VERDICT_OF_KIND = {
    "affine": "violates",
    "affine-bounded": "violates",
    "additive": "compliant",
    "rq-spline": "compliant",
    "modified-rq-spline": "compliant",
}


@dataclass(frozen=True)
class Case:
    """One conformance case (see the module docstring for the format)."""

    id: str
    build: Callable[[], nn.Module]
    expected_kinds: list[str]
    library_sample: Callable[[nn.Module, Tensor, list[Tensor]], Tensor]
    library_log_prob: Callable[[nn.Module, Tensor, Tensor], Tensor]
    requires: str | None = None
    expected_verdicts: list[str | None] | None = None
    xfail: dict[str, str] = field(default_factory=dict)
    atol: float = 1e-4
    rtol: float = 1e-4

    def verdicts(self) -> list[str | None]:
        """Expected Remark 2 verdict per site (from the kinds unless given); ``None``: not asserted."""
        if self.expected_verdicts is not None:
            return list(self.expected_verdicts)
        return [VERDICT_OF_KIND.get(k) for k in self.expected_kinds]


def fit_toy(
    model: nn.Module,
    nll: Callable[[nn.Module, Tensor, Tensor], Tensor],
    steps: int = 150,
    lr: float = 3e-3,
    batch: int = 128,
    seed: int = 0,
) -> nn.Module:
    """Train ``model`` briefly on the 2D toy (``nll(model, x, y)`` is the mean loss); returns it in eval mode.

    Seeded: data from :func:`flowaudit.reference_models.toy.toy_data` at ``seed``, fixed minibatch order.
    """
    from flowaudit.reference_models.toy import toy_data

    x_all, y_all = toy_data(batch * 8, seed=seed)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x_all), (batch,), generator=g)
        loss = nll(model, x_all[idx], y_all[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()
