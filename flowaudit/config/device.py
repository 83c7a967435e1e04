"""Where and how the audit runs: device resolution and the observe-only model context.

The model is observed, never altered: :func:`auditing` puts it in eval mode on
the audit device with gradients off and TF32 disabled (so GPU figures match
CPU ones), and restores every module's ``training`` flag, device and the TF32 switches on
exit, whatever happens inside.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator

import torch

from ..adapters import Adapter
from ..errors import AuditError
from .threads import using_threads

__all__ = ["resolve_device", "auditing"]


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` → CUDA when available, else CPU; anything else as given."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise AuditError(f"unknown device {device!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise AuditError(f"device {device!r} requested but CUDA is not available")
    return dev


def _placed(model: torch.nn.Module, device: torch.device) -> bool:
    """Whether every parameter and buffer of ``model`` is on ``device`` already (``model.to`` walks every module
    even then, milliseconds a call on a large model)."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return all(t.device == device for t in itertools.chain(model.parameters(), model.buffers()))


@contextlib.contextmanager
def auditing(adapter: Adapter, device: torch.device, threads: int | None = None) -> Iterator[None]:
    """Eval mode, no grad, TF32 off, model on ``device``, torch's CPU threads (:mod:`.threads`); all restored."""
    model = adapter.model
    was_training, was_device = {m: m.training for m in model.modules()}, adapter.device
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        if not _placed(model, device):
            model.to(device)
        model.eval()
        with torch.no_grad(), using_threads(threads):
            yield
    finally:
        for m, flag in was_training.items():  # per module (pre-order): a sub-module kept in eval mode stays so
            if m.training != flag:  # a model already in eval mode costs nothing here
                m.train(flag)
        if not _placed(model, was_device):
            model.to(was_device)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
