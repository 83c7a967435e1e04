r"""Untrusted checkpoint files: read them as tensors only, refuse what is broken in one line.

A checkpoint is input from a stranger. :func:`read_weights`
opens a ``.pt`` / ``.pth`` / ``.ckpt`` file with ``torch.load(weights_only=True)``
(pickled code only with ``trust``) or a ``.safetensors`` file, and turns every
way a file can be wrong — empty, truncated, random bytes, pickled code, a
corrupt safetensors header — into one :class:`ModelError` line naming the file
and the problem.

:func:`check_budget` refuses a model that is too large *before* it is
allocated: the model is first built on the ``meta`` device (shapes only, no
memory), its parameters counted as they register, and the build stops as soon
as the count passes the budget,

.. math:: n_\text{params} = \sum_{p \in \text{parameters}} \prod_i p.\text{shape}_i \le \text{budget},

so a checkpoint whose ``config`` asks for ``nf = 10^9`` costs nothing to refuse.
"""

from __future__ import annotations

import contextlib
import pickle
import warnings
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "ModelError",
    "pickled_code",
    "DEFAULT_MAX_PARAMETERS",
    "MAX_MODULES",
    "read_weights",
    "check_budget",
    "first_line",
    "fit_problems",
]

#: Default of ``--max-parameters``: 2·10⁹ parameters (8 GB of float32), far above any flow audited so far.
DEFAULT_MAX_PARAMETERS = 2_000_000_000
#: A configuration that asks for more sub-modules than this is refused too (no real flow has that many).
MAX_MODULES = 1_000_000


class ModelError(ValueError):
    """The model spec cannot be loaded (unknown name, unreadable checkpoint, …): exit code 2, one line."""


def first_line(exc: BaseException | str) -> str:
    """The first non-empty line of an exception's message (its type name when it has none)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if lines:
        return lines[0]
    return type(exc).__name__ if isinstance(exc, BaseException) else ""


def read_weights(path: str | Path, trust: bool = False, what: str = "checkpoint") -> Any:
    """The object stored in a checkpoint file; :class:`ModelError` (one line) for anything unreadable."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ModelError(f"{path}: cannot read {what}: {exc.strerror or first_line(exc)}") from None
    if path.is_dir():
        raise ModelError(f"{path}: is a folder, not a {what} file")
    if not path.is_file():  # a FIFO, socket or device: reading it could block forever or never end
        raise ModelError(f"{path}: not a regular file (a pipe, socket or device), not a {what}")
    if size == 0:
        raise ModelError(f"{path}: empty file, not a {what}")
    if path.suffix == ".safetensors":
        return _read_safetensors(path, what)
    return _read_torch(path, trust, what)


def _read_safetensors(path: Path, what: str) -> Any:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # SafetensorError, OSError, ValueError: a broken file, whatever the library calls it
        raise ModelError(f"{path}: corrupt .safetensors {what} ({first_line(exc)})") from None


def _read_torch(path: Path, trust: bool, what: str) -> Any:
    import torch

    with open(path, "rb") as f:
        head = f.read(4)
    try:
        is_zip = zipfile.is_zipfile(path)
    except (
        zipfile.BadZipFile,
        OSError,
        ValueError,
    ) as exc:  # e.g. "zipfiles that span multiple disks are not supported"
        raise ModelError(f"{path}: corrupt or truncated {what} ({first_line(exc)})") from None
    if not is_zip and head[:2] == b"PK":
        raise ModelError(f"{path}: corrupt or truncated {what} (a zip archive without its central directory)")
    if not is_zip and head[:1] != b"\x80":  # neither torch's zip format nor a protocol-2+ pickle
        if not trust and (code := _code_in(path, is_zip)):  # a protocol-0/1 pickle that imports a callable
            raise ModelError(
                f"{path}: holds pickled code ({code}); pass --trust-checkpoint only if you trust its source"
            )
        raise ModelError(f"{path}: not a PyTorch {what} (neither a zip archive nor a pickle)")
    try:
        with warnings.catch_warnings():  # torch warns about what hostile pickles ask for; the error line says enough
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if not trust and (code := _code_in(path, is_zip)):
            raise ModelError(
                f"{path}: holds pickled code ({code}); pass --trust-checkpoint only if you trust its source"
            ) from None
        if not trust and "Unsupported global" in text:
            name = _global_name(text)
            raise ModelError(
                f"{path}: holds pickled code{name}; pass --trust-checkpoint only if you trust its source"
            ) from None
        raise ModelError(f"{path}: corrupt or truncated {what} ({_torch_reason(text)})") from None
    except Exception as exc:  # torch's readers fail on hostile bytes in many ways (RuntimeError, AssertionError, …)
        if not trust and (code := _code_in(path, is_zip)):
            raise ModelError(
                f"{path}: holds pickled code ({code}); pass --trust-checkpoint only if you trust its source"
            ) from None
        raise ModelError(
            f"{path}: corrupt or truncated {what} ({_torch_reason(str(exc)) or type(exc).__name__})"
        ) from None


def pickled_code(path: str | Path) -> str:
    """The first callable the pickle in checkpoint ``path`` imports beyond tensors ("" when none or unreadable).

    Read, never run (:func:`_code_in`): lets a loader that failed say "holds code" rather than "corrupt".
    """
    path = Path(path)
    try:
        return _code_in(path, zipfile.is_zipfile(path)) if path.is_file() else ""
    except Exception:  # unreadable: not evidence of code
        return ""


def _code_in(path: Path, is_zip: bool) -> str:
    """The first callable a pickle imports that torch's tensor-only loader does not allow ("" when none).

    The pickle is *read*, never run: :func:`pickletools.genops` lists its opcodes, and the names that
    ``GLOBAL`` / ``INST`` / ``STACK_GLOBAL`` import are compared with torch's allow-list. A stream that
    does not parse is corrupt, not code. This tells "holds code" from "corrupt" whatever torch's error says.
    """
    try:
        if is_zip:
            with zipfile.ZipFile(path) as z:
                name = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
                data = z.read(name) if name else b""
        else:
            data = path.read_bytes()
        names = _pickle_globals(data)
    except Exception:  # unreadable: not evidence of code
        return ""
    allowed = _allowed_globals()
    return next((n for n in names if n not in allowed and not n.startswith("torch.")), "")


def _pickle_globals(data: bytes) -> list[str]:
    """``module.name`` of every global a pickle stream imports, in order; raises when the stream does not parse."""
    import pickletools

    names, strings = [], []
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("GLOBAL", "INST"):
            names.append(str(arg).replace(" ", "."))
        elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
            names.append(f"{strings[-2]}.{strings[-1]}")
        elif isinstance(arg, str) and "UNICODE" in op.name or op.name.endswith("STRING"):
            strings.append(str(arg))
        if op.name == "STOP":
            break
    return names


def _allowed_globals() -> set[str]:
    """What ``torch.load(weights_only=True)`` accepts besides ``torch.*`` (its private allow-list when present)."""
    allowed = {"collections.OrderedDict", "builtins.set", "builtins.frozenset", "builtins.slice",
               "builtins.bytearray", "builtins.complex", "_codecs.encode"}  # fmt: skip
    try:
        from torch import _weights_only_unpickler as wou

        for key in wou._get_allowed_globals():
            allowed.add(str(key).replace(" ", "."))
    except Exception:  # a torch without it: the plain list above
        pass
    return allowed


def _global_name(text: str) -> str:
    """`` (numpy.dtype)`` from torch's "Unsupported global: GLOBAL numpy.dtype …" message, else ``""``."""
    marker = "GLOBAL "
    at = text.find(marker)
    if at < 0:
        return ""
    name = text[at + len(marker) :].split()[0].rstrip(".,:;")
    return f" ({name})" if name else ""


def _torch_reason(text: str) -> str:
    """torch's long load errors reduced to their useful part."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if line.startswith("WeightsUnpickler error:"):
            reason = line.removeprefix("WeightsUnpickler error:").strip()
            return (reason or (lines[i + 1] if i + 1 < len(lines) else "unreadable pickle"))[:160]
    line = first_line(text)
    if "Weights only load failed" in line:
        return "unreadable pickle"
    return line[:160]


@contextlib.contextmanager
def _counting(budget: int, source: str) -> Iterator[dict]:
    """Count parameters and modules as a model registers them; raise :class:`ModelError` past the budget."""
    import torch
    from torch.nn.modules import module as nn_module

    seen = {"parameters": 0, "modules": 0}

    def on_parameter(module, name, param):
        if param is not None:
            seen["parameters"] += param.numel()
            if seen["parameters"] > budget:
                raise _Refused(
                    f"{source}: the model needs more than {budget:,} parameters (--max-parameters); "
                    "raise the limit only if you trust this configuration"
                )

    def on_module(module, name, sub):
        seen["modules"] += 1
        if seen["modules"] > MAX_MODULES:
            raise _Refused(f"{source}: the configuration asks for more than {MAX_MODULES:,} modules; refused as absurd")

    handles = [
        nn_module.register_module_parameter_registration_hook(on_parameter),
        nn_module.register_module_module_registration_hook(on_module),
    ]
    try:
        with torch.device("meta"):
            yield seen
    finally:
        for h in handles:
            h.remove()


class _Refused(ModelError):
    """Raised from inside a registration hook, so that the constructor's own errors stay apart."""


def check_budget(build: Callable[[], Any], budget: int | float, source: str) -> int:
    """Build the model on the ``meta`` device and count its parameters; refuse it above ``budget``.

    Returns the parameter count. ``build`` raising (an invalid configuration) is a
    :class:`ModelError` naming ``source``.
    """
    budget = int(budget)
    try:
        with _counting(budget, source):
            model = build()
        return sum(p.numel() for p in model.parameters())
    except _Refused as exc:
        raise ModelError(str(exc)) from None
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"{source}: invalid model configuration ({type(exc).__name__}: {first_line(exc)})") from None


def fit_problems(own: dict, state: dict) -> str:
    """What keeps ``state`` from loading into a model whose state dict is ``own``, in one line ("" when it fits)."""
    missing, unexpected = [k for k in own if k not in state], [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(getattr(state[k], "shape", ())) != tuple(own[k].shape)]
    return "; ".join(
        f"{what} {', '.join(keys[:3])}{', …' if len(keys) > 3 else ''} ({len(keys)})"
        for what, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch at", shapes))
        if keys
    )
