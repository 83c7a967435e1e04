r"""The memory budget of a run (``--max-memory``) and the batch size it allows.

The budget :math:`M` defaults to half of the memory available now (``MemAvailable`` on Linux; on a GPU, 80 % of
the device's free memory). Before sampling, :func:`probe_pass` runs one input's :math:`K` samples and measures
the bytes :math:`b` a sample costs on top of what stays resident, :math:`R`: the allocator's peak on a GPU, the
peak of tensor storage alive during the pass on the CPU (:class:`LiveTensors`, so that every process gets the
same :math:`b`; :func:`pass_bytes`). Then

.. math:: \text{batch} = K \,\Big\lfloor \frac{M - R}{b K} \Big\rfloor \quad (\ge K)

samples per inverse pass (whole inputs); an exact run only checks that one input's pass fits. Nothing else grows
with the number of inputs. :func:`peak_rss` is the report's ``settings.peak_rss_bytes``.
"""

from __future__ import annotations

import contextlib
import functools
import re
import resource
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from ..errors import AuditError

__all__ = [
    "parse_size",
    "default_budget",
    "resident",
    "peak_rss",
    "LiveTensors",
    "pass_bytes",
    "probe_pass",
    "batch_for",
    "steady_allocator",
    "release",
]

_UNITS = {
    "": 1,
    "B": 1,
    "K": 1e3,
    "KB": 1e3,
    "M": 1e6,
    "MB": 1e6,
    "G": 1e9,
    "GB": 1e9,
    "T": 1e12,
    "TB": 1e12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


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


class LiveTensors(TorchFunctionMode):
    """Bytes of tensor storage made inside the block by torch functions called from Python and still
    alive, counted call by call; ``peak_`` is the largest count. The CPU allocator keeps no such
    statistic (on a GPU: ``max_memory_allocated``).

    A storage a call returns is new unless one of the call's arguments holds it (a view, an in-place
    op); it is counted until its last reference dies (a weak reference's callback). What a kernel or a
    composite function makes and frees inside one call is not seen. Unlike the resident size, the
    count is the same in every process for the same calls. (A function mode, not a dispatch mode: the
    latter imports torch's compiler stack, some 80 MB resident.)
    """

    def __init__(self) -> None:
        super().__init__()
        self.live_ = self.peak_ = 0
        self._seen: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def _freed(self, nbytes: int, _: Any) -> None:
        self.live_ -= nbytes

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        for t in tree_leaves((args, kwargs)):
            storage = _storage(t)
            if storage is not None:
                self._seen.setdefault(storage, None)
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            storage = _storage(t)
            if storage is not None and storage not in self._seen:
                nbytes = storage.nbytes()
                self._seen[storage] = weakref.ref(storage, functools.partial(self._freed, nbytes))
                self.live_ += nbytes
                self.peak_ = max(self.peak_, self.live_)
        return out


def _storage(t: Any) -> torch.UntypedStorage | None:
    """``t``'s storage; ``None`` for anything else and for tensors without one (sparse, nested)."""
    if not isinstance(t, torch.Tensor):
        return None
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None


class _Watch:
    """The largest resident size read after every module's forward while :meth:`watching`."""

    def __init__(self) -> None:
        self.top_ = resident()

    def look(self, *_: Any) -> None:
        self.top_ = max(self.top_, resident())

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        handle = torch.nn.modules.module.register_module_forward_hook(self.look)
        try:
            yield
        finally:
            handle.remove()


def pass_bytes(run: Callable[[], Any]) -> tuple[int, int]:
    """(bytes a CPU pass ``run()`` needs, bytes resident after it).

    The larger of 1.25 × the peak of :class:`LiveTensors` (the 0.25 for what it does not see: a
    call's own temporaries, allocator slack) and the resident size read after every module's forward
    over the resident size after the pass (which holds what a first pass sets up once: compiled
    kernels, caches). The count decides for an eager model and is the same in every process; the
    reads catch what calls from Python do not show (a scripted or compiled module).
    """
    release()
    watch = _Watch()
    with watch.watching(), LiveTensors() as live:
        run()
        watch.look()
    release()
    base = resident()
    return max(int(1.25 * live.peak_), watch.top_ - base), base


def probe_pass(adapter: Any, y: torch.Tensor, sampling: Any, device: torch.device) -> tuple[int, int]:
    """(bytes per sample, bytes resident beside a pass) from one traced pass of ``y[:1]``'s K samples.

    GPU: the allocator's peak over what was allocated before; CPU: :func:`pass_bytes`.
    """
    from ..tracing.trace import Tracer

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
        used, base = pass_bytes(lambda: adapter.sample(sampling.repeat(y), latents, observer=tracer))
        tracer.end_batch(1)
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
        raise AuditError(
            f"--max-memory {budget / 1e9:.2f} GB leaves {max(room, 0) / 1e6:.0f} MB beside the "
            f"{resident_now / 1e6:.0f} MB already resident, one input's {samples} samples need about "
            f"{need / 1e6:.0f} MB: raise --max-memory or lower --samples"
        )
    if exact:
        return samples
    return samples * max(1, room // need)
