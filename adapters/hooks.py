"""Forward hooks that observe a model and leave no trace.

Every hook is removed in a ``finally`` (an :class:`~contextlib.ExitStack` of handles), also when the
forward pass raises, and a failure inside a hook names the layer. :func:`wrapped` wraps a module's
``forward`` instead (same contract, cheaper a call) for models whose code is known. Where a pass's
tensors stay intact until it returns, :class:`HeldReports` holds its reports by reference and makes
them in bursts, once :data:`HOLD_BYTES` are held and when the pass returns, so the audit runs between
the model's layers a few times a pass instead of at every call. The bursts are small, about a core's L2:
held longer, a larger pass's tensors cost more to keep alive and read back from memory than the switches
they save (``benchmarks/README.md``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from torch import Tensor, nn

__all__ = ["HookError", "HeldReports", "HOLD_BYTES", "holding", "hooked", "wrapped", "first_tensor"]


HOLD_BYTES = 2 << 20  # a pass's held tensors, at most: about a core's L2 (module docstring)


@contextlib.contextmanager
def holding(nbytes: int) -> Iterator[None]:
    """Hold at most ``nbytes`` of a pass's tensors inside the block instead of :data:`HOLD_BYTES` (with 0,
    each report is made as its call returns: the memory probe measures the audit's bytes without the hold)."""
    global HOLD_BYTES
    before, HOLD_BYTES = HOLD_BYTES, nbytes
    try:
        yield
    finally:
        HOLD_BYTES = before


class HookError(RuntimeError):
    """Raised when a hook fails; the message names the module."""


def first_tensor(output: Any) -> Tensor:
    """The tensor a module returned (first element of a tuple/list, or the tensor itself)."""
    while isinstance(output, (tuple, list)):
        output = output[0]
    if not isinstance(output, Tensor):
        raise TypeError(f"module returned {type(output).__name__}, not a tensor")
    return output


def _find(model: nn.Module, name: str) -> nn.Module:
    """The sub-module at dotted path ``name``, walked through the children (a pass hooks every time: this is
    ``get_submodule`` without its checks, which cost more than the hooks); an unknown path raises :class:`KeyError`."""
    module = model
    for part in name.split(".") if name else ():
        module = module._modules.get(part)
        if module is None:
            some = ", ".join([k for k, _ in model.named_modules() if k][:8])
            raise KeyError(f"no module named {name!r} in the model (some names: {some}, …)")
    return module


def _after(fn: Callable[[str, tuple, dict, Any], None], name: str, args: tuple, kwargs: dict, output: Any) -> None:
    """``fn(name, args, kwargs, output)`` after a forward of module ``name``; a failure names the module."""
    try:
        fn(name, args, kwargs, output)
    except Exception as exc:
        raise HookError(f"hook on {name!r} failed: {exc}") from exc


@contextlib.contextmanager
def hooked(model: nn.Module, names: Sequence[str], fn: Callable[[str, tuple, dict, Any], None]) -> Iterator[None]:
    """Call ``fn(name, args, kwargs, output)`` after each forward of the named sub-modules.

    Unknown names raise :class:`KeyError` listing a few valid ones. Handles are
    removed on exit, whatever happens inside the block.
    """
    modules = {name: _find(model, name) for name in names}

    def make(name: str):
        def hook(module, args, kwargs, output):
            _after(fn, name, args, kwargs, output)

        return hook

    with contextlib.ExitStack() as stack:
        for name in names:
            handle = modules[name].register_forward_hook(make(name), with_kwargs=True)
            stack.callback(handle.remove)
        yield


@contextlib.contextmanager
def wrapped(model: nn.Module, names: Sequence[str], fn: Callable[[str, tuple, dict, Any], None]) -> Iterator[None]:
    """:func:`hooked` by wrapping the named sub-modules' ``forward`` (an instance attribute, removed on exit).

    For models whose modules the adapter knows (the bundled flows): a module with a forward hook takes
    torch's slow call path, which for the 47 hooked modules of an exact SR pass costs 0.46 ± 0.21 ms a
    pass more than a wrapped ``forward`` (benchmarks/README.md). Unlike a hook, the wrapper also sees a
    direct ``module.forward(…)`` call; the bundled flows make none. Nested blocks unwrap in turn.
    """
    modules = {name: _find(model, name) for name in names}
    with contextlib.ExitStack() as stack:
        for name, module in modules.items():
            stack.callback(_wrap(module, name, fn))
        yield


def _wrap(module: nn.Module, name: str, fn: Callable[[str, tuple, dict, Any], None]) -> Callable[[], None]:
    """Wrap ``module.forward`` to call ``fn`` after it; returns what puts the previous ``forward`` back."""
    inner = module.forward  # the class's bound method, or an outer block's wrapper
    had = "forward" in vars(module)

    def forward(*args: Any, **kwargs: Any) -> Any:
        output = inner(*args, **kwargs)
        _after(fn, name, args, kwargs, output)
        return output

    def unwrap() -> None:
        if had:
            module.forward = inner
        else:
            del module.forward

    module.forward = forward
    return unwrap


class HeldReports:
    """The reports of an observed pass, held by reference and made once it returns (module docstring).

    :meth:`hold` keeps ``report(name, a, b)`` with the version counters of tensors ``a`` and ``b``
    (``b`` may be ``None``); :meth:`flush` makes the held reports in call order, first checking that
    no tensor was written in place since (else it raises: the adapter's claim was wrong). A call that
    cannot be held (a tensor in autograd, or an inference tensor, which counts no versions) flushes
    what is held and is left to the caller to make now. Past :data:`HOLD_BYTES` held, they are made
    at once (the memory a pass holds stays bounded).
    """

    def __init__(self) -> None:
        self._calls: list[tuple] = []
        self._bytes = 0

    def hold(self, report: Callable[[str, Tensor, Any], None], name: str, a: Tensor, b: Tensor | None = None) -> bool:
        """Hold a report; ``False`` (after a flush) where ``a`` or ``b`` cannot be held: make it now."""
        if not (_holdable(a) and (b is None or _holdable(b))):
            self.flush()
            return False
        self._calls.append((report, name, a, a._version, b, None if b is None else b._version))
        self._bytes += a.nbytes + (0 if b is None else b.nbytes)
        if self._bytes > HOLD_BYTES:
            self.flush()
        return True

    def flush(self) -> None:
        """Make the held reports, in call order."""
        calls, self._calls, self._bytes = self._calls, [], 0
        for report, name, a, va, b, vb in calls:
            if a._version != va or (b is not None and b._version != vb):
                raise RuntimeError(
                    f"{name}: a tensor held for its report was written in place before the pass returned; "
                    "its adapter's tensors do not stay intact"
                )
            report(name, a, b)

    def drop(self) -> None:
        """Forget the held reports (a pass that raised)."""
        self._calls, self._bytes = [], 0


def _holdable(t: Tensor) -> bool:
    """Whether ``t`` may be held for a later report: out of autograd, and counting its in-place writes."""
    return not t.requires_grad and not t.is_inference()
