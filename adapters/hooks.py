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


@contextlib.contextmanager
def hooked(model: nn.Module, names: Sequence[str], fn: Callable[[str, tuple, dict, Any], None]) -> Iterator[None]:
    """Call ``fn(name, args, kwargs, output)`` after each forward of the named sub-modules.

    Unknown names raise :class:`KeyError` listing a few valid ones. Handles are
    removed on exit, whatever happens inside the block.
    """
    modules = {}
    for name in names:  # by path: a pass hooks every time, and a large model has many modules to list
        try:
            modules[name] = model.get_submodule(name)
        except AttributeError:
            some = ", ".join([k for k, _ in model.named_modules() if k][:8])
            raise KeyError(f"no module named {name!r} in the model (some names: {some}, …)") from None

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


