r"""Attack budgets: where a search on the condition may go, how it steps, how far it went.

A budget is parsed from one string (``linf:EPS``, ``l2:EPS``, ``box:LO,HI`` or ``none``)
and answers three questions about a perturbation :math:`\delta = y - y_0` of a start
:math:`y_0`:

* **projection** back into the set after each step,

  .. math:: \Pi_{\infty}(y) = y_0 + \operatorname{clip}(\delta, -\varepsilon, \varepsilon),\quad
            \Pi_{2}(y) = y_0 + \delta\,\min\!\left(1, \frac{\varepsilon}{\lVert\delta\rVert_2}\right),\quad
            \Pi_{\text{box}}(y) = \operatorname{clip}(y, \text{lo}, \text{hi}),

  then, for image conditions, the clip into their valid range (which never moves a point
  farther from :math:`y_0`, since :math:`y_0` lies in the range);
* **step direction** of steepest ascent for the budget's norm: :math:`\operatorname{sign}(g)`
  for :math:`L_\infty`, a box and ``none``; :math:`g / \lVert g\rVert_2` for :math:`L_2`;
* **distance** :math:`\lVert\delta\rVert` in the budget's norm (:math:`L_\infty` for a box and
  for ``none``).

Example:
    >>> b = parse_budget("linf:0.1")
    >>> b.kind, b.eps, b.norm
    ('linf', 0.1, 'linf')
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Budget", "parse_budget"]

_FORMS = "linf:EPS, l2:EPS, box:LO,HI or none"


@dataclass(frozen=True)
class Budget:
    """One attack budget (see module docstring); build it with :func:`parse_budget`."""

    kind: str  # linf, l2, box, none
    eps: float | None = None
    lo: float | None = None
    hi: float | None = None

    @property
    def norm(self) -> str:
        """The norm distances are measured in."""
        return "l2" if self.kind == "l2" else "linf"

    @property
    def radius(self) -> float | None:
        """The budget's size in its norm (a box: half its width); ``None`` when unbounded."""
        if self.kind == "box":
            return (self.hi - self.lo) / 2
        return self.eps

    def spec(self) -> str:
        """The budget as the CLI writes it."""
        if self.kind == "box":
            return f"box:{self.lo:g},{self.hi:g}"
        return "none" if self.kind == "none" else f"{self.kind}:{self.eps:g}"

    def to_dict(self) -> dict:
        return {
            "spec": self.spec(),
            "kind": self.kind,
            "eps": self.eps,
            "lo": self.lo,
            "hi": self.hi,
            "norm": self.norm,
        }

    # -- geometry (rows are starts, batch first) -------------------------------------------
    def project(self, y: Tensor, y0: Tensor, valid: tuple[float, float] | None = None) -> Tensor:
        """``y`` projected into the budget around ``y0``, then into ``valid`` when given."""
        d = y - y0
        if self.kind == "linf":
            y = y0 + d.clamp(-self.eps, self.eps)
        elif self.kind == "l2":
            n = d.flatten(1).norm(dim=1).clamp_min(1e-30)
            y = y0 + d * (self.eps / n).clamp(max=1.0).view(-1, *[1] * (d.dim() - 1))
        elif self.kind == "box":
            y = y.clamp(self.lo, self.hi)
        if valid is not None:
            y = y.clamp(valid[0], valid[1])
        return y

    def direction(self, g: Tensor) -> Tensor:
        """The unit step of steepest ascent along gradient ``g`` in the budget's norm."""
        if self.kind == "l2":
            n = g.flatten(1).norm(dim=1).clamp_min(1e-30)
            return g / n.view(-1, *[1] * (g.dim() - 1))
        return g.sign()

    def distance(self, y: Tensor, y0: Tensor) -> Tensor:
        """``‖y − y0‖`` per row, in the budget's norm."""
        d = (y - y0).flatten(1).to(torch.float64)
        return d.norm(dim=1) if self.norm == "l2" else d.abs().amax(1)


def parse_budget(text: str) -> Budget:
    """``linf:EPS``, ``l2:EPS``, ``box:LO,HI`` or ``none``; ``ValueError`` (one line) otherwise."""
    s = str(text).strip().lower()
    if s == "none":
        return Budget("none")
    kind, sep, rest = s.partition(":")
    if not sep or kind not in ("linf", "l2", "box"):
        raise ValueError(f"bad budget {text!r}: expected {_FORMS}")
    try:
        if kind == "box":
            lo_s, comma, hi_s = rest.partition(",")
            if not comma:
                raise ValueError
            lo, hi = _number(lo_s), _number(hi_s)
            if not lo < hi:
                raise ValueError
            return Budget("box", lo=lo, hi=hi)
        eps = _number(rest)
        if not eps > 0:
            raise ValueError
        return Budget(kind, eps=eps)
    except ValueError:
        raise ValueError(f"bad budget {text!r}: expected {_FORMS} with finite numbers, EPS > 0 and LO < HI") from None


def _number(s: str) -> float:
    """A finite float, written plainly or as a fraction (``8/255``)."""
    num, slash, den = s.strip().partition("/")
    if slash and float(den) == 0:
        raise ValueError
    v = float(num) / float(den) if slash else float(num)
    if not math.isfinite(v):
        raise ValueError
    return v
