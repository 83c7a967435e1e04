"""Forward hooks that observe a model and leave no trace.

Every hook is registered inside a context manager whose ``finally`` removes
it (an :class:`~contextlib.ExitStack` of handles), also when the forward pass
raises. A failure inside a hook names the layer. Adapters use :func:`hooked`
to report sites and layers to an observer; the engine uses it to capture
encoder features.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from torch import Tensor, nn

__all__ = ["HookError", "hooked", "first_tensor"]


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


@contextlib.contextmanager
def hooked(model: nn.Module, names: Sequence[str], fn: Callable[[str, tuple, dict, Any], None]) -> Iterator[None]:
    """Call ``fn(name, args, kwargs, output)`` after each forward of the named sub-modules.

    Unknown names raise :class:`KeyError` listing a few valid ones. Handles are
    removed on exit, whatever happens inside the block.
    """
    modules = {name: _find(model, name) for name in names}

    def make(name: str):
        def hook(module, args, kwargs, output):
            try:
                fn(name, args, kwargs, output)
            except Exception as exc:  # name the layer where it happened
                raise HookError(f"hook on {name!r} failed: {exc}") from exc

        return hook

    with contextlib.ExitStack() as stack:
        for name in names:
            handle = modules[name].register_forward_hook(make(name), with_kwargs=True)
            stack.callback(handle.remove)
        yield


