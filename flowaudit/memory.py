r"""The memory budget of a run (``--max-memory``) and the batch size it allows (issue 12).

The budget :math:`M` defaults to half of the memory the machine has available
now (``MemAvailable`` on Linux; on a GPU, 80 % of the device's free memory).
Before sampling, :func:`probe_pass` runs one input's :math:`K` samples and
measures what a pass costs on top of what is already resident :math:`R`
(model, data): on a GPU the allocator's peak, on the CPU the largest resident
size read at every layer of the pass. With :math:`b` bytes per sample,

.. math:: \text{batch} = K \,\Big\lfloor \frac{M - R}{b K} \Big\rfloor \quad (\ge K),

samples per inverse pass (whole inputs). An exact run (one input per pass,
:attr:`~flowaudit.sampling.Run.exact`) only checks that one pass fits.
Records go to the run's shards; nothing else grows with the number of inputs.
:func:`peak_rss` is what the report's ``settings.peak_rss_bytes`` says.
"""

from __future__ import annotations

import contextlib
import re
import resource
from collections.abc import Iterator
from typing import Any

import torch

from .errors import AuditError

__all__ = ["parse_size", "default_budget", "resident", "peak_rss", "probe_pass", "batch_for", "steady_allocator", "release"]

_UNITS = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9, "T": 1e12, "TB": 1e12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int | float) -> int:
    """``"2GB"``, ``"512MiB"``, ``"1.5G"`` or a number of bytes → bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"cannot read memory size {text!r}: give a number with a unit, e.g. 2GB or 512MB")
    size = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if size <= 0:
        raise ValueError(f"memory size {text!r} must be positive")
    return size


def _available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def default_budget(device: torch.device) -> int:
    """Half the available RAM (CPU) or 80 % of the free device memory (GPU), plus what is resident now."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(0.8 * free) + torch.cuda.memory_allocated(device)
    return int(0.5 * _available()) + resident()


def resident() -> int:
    """Resident set size of this process now, bytes (Linux ``/proc/self/statm``; else the peak)."""
    try:
        with open("/proc/self/statm") as f:
            import os

            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss()


def peak_rss() -> int:
    """Peak resident set size of this process so far, bytes."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class _Watch:
    """An observer that passes everything on to a tracer and reads the resident size after each call, and after
    every module's forward while :meth:`watching` (a pass's reports may come only once it has returned:
    :class:`~flowaudit.adapters.hooks.HeldReports`)."""

    def __init__(self, tracer: Any) -> None:
        self.tracer, self.top = tracer, resident()

    def look(self, *_: Any) -> None:
        self.top = max(self.top, resident())

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        handle = torch.nn.modules.module.register_module_forward_hook(self.look)
        try:
            yield
        finally:
            handle.remove()

    def layer(self, name: str, x: Any) -> None:
        self.tracer.layer(name, x)
        self.look()

    def site(self, name: str, gain: Any, params: Any) -> None:
        self.tracer.site(name, gain, params)
        self.look()


def probe_pass(adapter: Any, y: torch.Tensor, sampling: Any, device: torch.device) -> tuple[int, int]:
    """(bytes per sample, bytes resident before) of one traced pass of ``y[:1]``'s K samples.

    CPU: the larger of the resident size read after every module's forward and every report and the growth
    of the process's peak, times 1.25 for the temporaries inside a module that neither sees.
    """
    from .trace import Tracer

    y = y[:1].to(device)
    latents = sampling.latents(adapter, y, 0, 0, device)
    tracer = Tracer(sampling)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        adapter.sample(sampling.repeat(y), latents, observer=tracer)
        tracer.end_batch(1)
        torch.cuda.synchronize(device)
        used = torch.cuda.max_memory_allocated(device) - base
    else:
        peak0 = peak_rss()
        watch = _Watch(tracer)
        base = watch.top
        with watch.watching():
            x = adapter.sample(sampling.repeat(y), latents, observer=watch)
        watch.layer("output", x)
        tracer.end_batch(1)
        used = int(1.25 * max(watch.top - base, peak_rss() - max(peak0, base)))
        del x
    floor = 8 * 4 * max(int(y[0].numel()) * adapter_scale(adapter) ** 2, 1)  # a few copies of one float32 sample
    return max(used // sampling.samples, floor), base


def steady_allocator() -> None:
    """glibc: serve every block over 1 MiB by mmap (returned on free) and stop the threshold drifting up.

    By default glibc raises its mmap threshold each time a large block is freed, after which
    large tensors come from the heap and freed ones stay resident: the peak then creeps up with
    the number of passes. Fixing the threshold keeps it flat. No-op elsewhere.
    """
    global _STEADY
    if _STEADY:
        return
    _STEADY = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 22)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def release() -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``), e.g. after each shard."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


_STEADY = False


def adapter_scale(adapter: Any) -> int:
    return int(getattr(adapter, "scale", 1) or 1)


def batch_for(budget: int, resident_now: int, per_sample: int, samples: int, exact: bool) -> int:
    """Samples per inverse pass under ``budget`` (see module docstring); refuses when one input's pass does not fit."""
    room = budget - resident_now
    need = per_sample * samples
    if room < need:
        raise AuditError(f"--max-memory {budget / 1e9:.2f} GB leaves {max(room, 0) / 1e6:.0f} MB beside the "
                         f"{resident_now / 1e6:.0f} MB already resident, one input's {samples} samples need about "
                         f"{need / 1e6:.0f} MB: raise --max-memory or lower --samples")
    if exact:
        return samples
    return samples * max(1, room // need)
