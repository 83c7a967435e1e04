r"""The memory budget of a run (``--max-memory``) and the batch size it allows.

The budget :math:`M` defaults to half of the memory available now (``MemAvailable`` on Linux; on a GPU, 80 % of
the device's free memory). Before sampling, :func:`probe_pass` finds the bytes :math:`b` a sample costs on top of
what stays resident, :math:`R`: the allocator's peak on a GPU, the peak of tensor storage alive during the pass on
the CPU (:class:`LiveTensors`, so that every process gets the same :math:`b`; :func:`pass_bytes`). Then

.. math:: \text{batch} = K \,\Big\lfloor \frac{M - R}{b K} \Big\rfloor \quad (\ge K)

samples per inverse pass (whole inputs); an exact run only checks that one input's pass fits. Nothing else grows
with the number of inputs. :func:`peak_rss` is the report's ``settings.peak_rss_bytes``.

When :math:`b` only checks that one input's pass fits (exact passes, or a batch size given), an image model's
pass is not run at the data's size to find it (that would cost one more input's pass). One input's :math:`K`
samples are measured at two small crops of the first condition, :math:`p_1 < p_2` pixels (the adapter's
``probe_shape`` and twice its side, sizes its squeezes take), and the bytes :math:`B` extrapolated linearly in
the pixel count :math:`p` of the data,

.. math:: B(p) = \max\!\Big(B_2,\; \mu \big(B_1 + \tfrac{B_2 - B_1}{p_2 - p_1}\,(p - p_1)\big)\Big), \qquad \mu = 1.2,

since a fully convolutional flow's activations are :math:`a + c\,p` bytes (:math:`a` the tracer's and the
latents' fixed part). The margin :math:`\mu` covers what grows with :math:`p` unseen by the count (allocator
slack, the resident reads of :func:`pass_bytes`): the estimate is 1.0–1.4 × the measured :func:`pass_bytes`
on the bundled SR flow at 8× the probe's side (``tests/test_memory.py``), 1.25 × on a full-size SRFlow at
160×160. The crops cost :math:`(p_1 + p_2) / p` of one pass (1.25 % at 160×160 from 8×8 and 16×16). The pass
runs at the data's size instead when the data is under twice the larger crop's side, for vectors, when a crop
is refused or fails, and when the resident read at :math:`p_2` exceeds twice the count (calls the count cannot
see: a scripted module, whose bytes need not follow the count).
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
    count, read, base = _pass_parts(run)
    return max(count, read), base


def _pass_parts(run: Callable[[], Any]) -> tuple[int, int, int]:
    """(1.25 × the count of :class:`LiveTensors`, the resident read, bytes resident after): see :func:`pass_bytes`."""
    release()
    watch = _Watch()
    with watch.watching(), LiveTensors() as live:
        run()
        watch.look()
    release()
    base = resident()
    return int(1.25 * live.peak_), watch.top_ - base, base


MARGIN = 1.2  # on the extrapolated bytes of an image model's pass (module docstring)


def probe_pass(adapter: Any, y: Any, sampling: Any, device: torch.device, extrapolate: bool = True) -> tuple[int, int]:
    """(bytes per sample, bytes resident beside a pass) for one input's K samples at ``y[0]``'s size.

    Image models with ``extrapolate``: from two small crops (module docstring); else, or when the data is
    that small already, one traced pass of ``y[:1]``'s K samples. GPU: the allocator's peak over what was
    allocated before; CPU: :func:`pass_bytes`. A run whose batch the bytes decide (passes of several inputs
    sized by the budget) measures at the data's size, so its batch size stays what that pass gives.
    """
    y = _first_row(y)
    floor = 8 * 4 * max(int(y[0].numel()) * adapter_scale(adapter) ** 2, 1)  # a few copies of one float32 sample
    crops = _probe_crops(adapter, tuple(y.shape[1:])) if extrapolate else None
    used = None
    if crops is not None:
        used = _extrapolated(adapter, y, sampling, device, crops)
    if used is None:
        count, read, base = _measure(adapter, y, sampling, device)
        used = (max(count, read), base)
    return max(used[0] // sampling.samples, floor), used[1]


def _first_row(y: Any) -> torch.Tensor:
    """The first condition of ``y`` (a tensor or a ragged set) with its batch axis."""
    items = getattr(y, "items", None)
    return items[0][None] if items is not None else y[:1]


def _probe_crops(adapter: Any, shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """The two small condition shapes an image pass is measured at, or ``None`` (measure at ``shape``)."""
    if len(shape) != 3:
        return None
    small = tuple(adapter.probe_shape)
    if len(small) != 3 or small[0] != shape[0]:
        return None
    first = small
    second = (small[0], 2 * small[1], 2 * small[2])
    if shape[1] < 2 * second[1] or shape[2] < 2 * second[2]:
        return None  # small data: its own pass costs little more than the crops
    try:
        adapter.check_condition_shape(first)
        adapter.check_condition_shape(second)
    except ValueError:
        return None
    return first, second


def _extrapolated(
    adapter: Any, y: torch.Tensor, sampling: Any, device: torch.device, crops: tuple
) -> tuple[int, int] | None:
    """(bytes of one input's K samples at ``y``'s size, bytes resident) from the two ``crops``; ``None`` when a
    crop's pass fails or the count misses what the resident read sees (module docstring)."""
    measured = []
    for _, h, w in crops:
        try:
            measured.append(_measure(adapter, y[..., :h, :w].contiguous(), sampling, device))
        except Exception:  # a size the model does not take after all: the data's own pass decides
            return None
    (c1, _, _), (c2, r2, base) = measured
    if r2 > 2 * max(c2, 1):
        return None
    p1, p2 = (h * w for _, h, w in crops)
    p = int(y.shape[-2]) * int(y.shape[-1])
    slope = max(c2 - c1, 0) / (p2 - p1)
    return max(c2, r2, int(MARGIN * (c1 + slope * (p - p1)))), base


def _measure(adapter: Any, y: torch.Tensor, sampling: Any, device: torch.device) -> tuple[int, int, int]:
    """(counted bytes, read bytes, bytes resident) of one traced pass of ``y``'s K samples (GPU: both the
    allocator's peak over what was allocated before)."""
    from ..tracing.trace import Tracer
    from .passes import spatial_sites

    y = y.to(device)
    latents = sampling.latents(adapter, y, 0, 0, device)
    tracer = Tracer(sampling, spatial=spatial_sites(adapter))  # the scan's own tracer: large rows kept as windows
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        adapter.sample(sampling.repeat(y), latents, observer=tracer)
        tracer.end_batch(1)
        torch.cuda.synchronize(device)
        used = torch.cuda.max_memory_allocated(device) - base
        return used, used, base
    count, read, base = _pass_parts(lambda: adapter.sample(sampling.repeat(y), latents, observer=tracer))
    tracer.end_batch(1)
    return count, read, base


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
