"""Scratch memory the tracer reuses from call to call.

A fresh tensor of a megabyte or more is mapped anew by the allocator and paid for in page
faults on first touch — on one CPU thread that costs more than the operation that fills it.
:class:`Scratch` keeps one flat buffer per (name, dtype, device), grown to the largest size
asked for, and hands out views of it; the tracer's statistics write their temporaries there.
It holds temporaries only, never a layer's values across calls; its size is that of the
largest layer or site output, whatever the number of inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["Scratch"]


class Scratch:
    """Named reusable buffers; a view handed out is valid until the same name is asked for again."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype, torch.device], Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device) -> Tensor:
        """A contiguous tensor of ``shape`` (contents undefined) in buffer ``name``."""
        n = 1
        for s in shape:
            n *= s
        key = (name, dtype, device)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < n:
            buf = self._buffers[key] = torch.empty(n, dtype=dtype, device=device)
        return buf[:n].view(shape)
