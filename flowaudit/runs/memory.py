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
``probe_shape`` and twice its side, sizes its squeezes take), once bare and once traced with each report made
as its call returns, and the bytes at the pixel count :math:`p` of the data are

.. math:: B(p) = \max\!\Big(T_2,\; \mu \big(M(p) + E(p) + 1.25\,H\big)\Big), \qquad \mu = 1.2.

:math:`M(p)` is the model's own: a fully convolutional flow's tensors alive after its :math:`j`-th call are
:math:`a_j + c_j\,p` bytes, so the bare passes' counts after each call, :math:`n_j(p_1)` and :math:`n_j(p_2)`,
are extrapolated call by call and :math:`M(p) = 1.25 \max_j n_j(p)` (not less than the line through the two
peaks). A line through the peaks alone misses a pass whose peak moves: the low-light flow's peak at the crops
is a part that does not grow with the pixels, and at 128×128 another part, twice the line's bytes, decides.
:math:`E(p)` is the tracer's share, :math:`E_i = T_i - B_i` at the crops (its fixed part and its temporaries,
which grow with the largest call), the larger of :math:`E_1`, :math:`E_2` and their line; :math:`H` is
:data:`~flowaudit.adapters.hooks.HOLD_BYTES`, the most a pass's held reports keep alive beyond the model. The
margin :math:`\mu` covers what grows with :math:`p` unseen by the count (allocator slack, the resident reads
of :func:`pass_bytes`): the estimate is 1.0–1.5 × the measured :func:`pass_bytes` on the bundled SR and
low-light flows at 8–16× the probe's side (``tests/test_memory.py``), 1.20 × on the released SRFlow DF2K ×4 and
NCSR ×4 configurations and 1.21 × on LLFlow LOL at 160×160 with K = 10. The crops cost about
:math:`2 (p_1 + p_2) / p` of one pass plus the model's fixed part: 10 s against a 320 s pass of SRFlow and NCSR,
3 s against 19 s of LLFlow. The pass runs at the data's
size instead when the data is under twice the larger crop's side, for vectors, when a crop is refused or
fails, when the two crops' passes make different calls (a model that branches on the size), and when the
resident read at :math:`p_2` exceeds twice the count (calls the count cannot see: a scripted module, whose
bytes need not follow the count).

The bytes hold for a process whose allocator hands large freed blocks back (:func:`steady_allocator`, which
the CLI and :func:`probe_pass` set). Under glibc's default, a threshold that rises as large blocks are freed,
freed tensors stay resident and a pass's resident peak depends on what ran before it: 1.2–1.4 × its tensors on
the bundled SR flow at 64×64 to 128×128, beyond any margin a count could carry.
"""

from __future__ import annotations

import contextlib
import functools
import re
import resource
import weakref
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

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
    count is the same in every process for the same calls. With ``record``, ``calls_`` keeps the count
    after each call (what :func:`probe_pass` extrapolates call by call). (A function mode, not a dispatch mode: the
    latter imports torch's compiler stack, some 80 MB resident.)
    """

    def __init__(self, record: bool = False) -> None:
        super().__init__()
        self.record = record
        self.live_ = self.peak_ = 0
        self.calls_: list[int] = []  # with ``record``: the count after each call
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
        if self.record:
            self.calls_.append(self.live_)
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


class _Pass(NamedTuple):
    """One measured pass: ``used`` the bytes it needs (CPU: 1.25 × the count; GPU: the allocator's peak over
    what was allocated before), ``read`` the resident read (GPU: ``used``), ``base`` the bytes resident or
    allocated beside it, ``calls`` the count after each call (bare passes)."""

    used: int
    read: int
    base: int
    calls: list[int]


def pass_bytes(run: Callable[[], Any]) -> tuple[int, int]:
    """(bytes a CPU pass ``run()`` needs, bytes resident after it).

    The larger of 1.25 × the peak of :class:`LiveTensors` (the 0.25 for what it does not see: a
    call's own temporaries, allocator slack) and the resident size read after every module's forward
    over the resident size after the pass (which holds what a first pass sets up once: compiled
    kernels, caches). The count decides for an eager model and is the same in every process; the
    reads catch what calls from Python do not show (a scripted or compiled module).
    """
    one = _pass_parts(run)
    return max(one.used, one.read), one.base


def _pass_parts(run: Callable[[], Any], record: bool = False) -> _Pass:
    """The CPU pass ``run()``: 1.25 × the count of :class:`LiveTensors`, the resident read, the bytes resident
    after, and the count after each call if ``record`` (see :func:`pass_bytes`)."""
    release()
    watch = _Watch()
    with watch.watching(), LiveTensors(record) as live:
        run()
        watch.look()
    release()
    base = resident()
    return _Pass(int(1.25 * live.peak_), watch.top_ - base, base, live.calls_)


MARGIN = 1.2  # on the extrapolated bytes of an image model's pass (module docstring)


def probe_pass(adapter: Any, y: Any, sampling: Any, device: torch.device, extrapolate: bool = True) -> tuple[int, int]:
    """(bytes per sample, bytes resident beside a pass) for one input's K samples at ``y[0]``'s size.

    Image models with ``extrapolate``: from two small crops (module docstring); else, or when the data is
    that small already, one traced pass of ``y[:1]``'s K samples. GPU: the allocator's peak over what was
    allocated before; CPU: :func:`pass_bytes`. A run whose batch the bytes decide (passes of several inputs
    sized by the budget) measures at the data's size, so its batch size stays what that pass gives. On the
    CPU it first fixes glibc's thresholds for the process (:func:`steady_allocator`, as the CLI does).
    """
    if device.type == "cpu":
        steady_allocator()  # else freed blocks stay resident and no count predicts the resident size
    y = _first_row(y)
    floor = 8 * 4 * max(int(y[0].numel()) * adapter_scale(adapter) ** 2, 1)  # a few copies of one float32 sample
    crops = _probe_crops(adapter, tuple(y.shape[1:])) if extrapolate else None
    used = None
    if crops is not None:
        used = _extrapolated(adapter, y, sampling, device, crops)
    if used is None:
        one = _measure(adapter, y, sampling, device)
        used = (max(one.used, one.read), one.base)
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
    crop's pass fails, the two crops' passes make different calls, or the count misses what the resident
    read sees (module docstring)."""
    from ..adapters import hooks

    bare, traced = [], []
    for _, h, w in crops:
        crop = y[..., :h, :w].contiguous()
        try:
            bare.append(_measure(adapter, crop, sampling, device, traced=False))
            with hooks.holding(0):
                traced.append(_measure(adapter, crop, sampling, device))
        except Exception:  # a size the model does not take after all: the data's own pass decides
            return None
    (b1, b2), (t1, t2) = bare, traced
    if t2.read > 2 * max(t2.used, 1) or len(b1.calls) != len(b2.calls) or not b1.calls:
        return None
    p1, p2 = (h * w for _, h, w in crops)
    p = int(y.shape[-2]) * int(y.shape[-1])
    calls = max(_line(a, b, p1, p2, p) for a, b in zip(b1.calls, b2.calls))
    model = max(1.25 * calls, _line(b1.used, b2.used, p1, p2, p))
    e1, e2 = t1.used - b1.used, t2.used - b2.used
    audit = max(e1, e2, _line(e1, e2, p1, p2, p), 0) + 1.25 * hooks.HOLD_BYTES
    return max(t2.used, t2.read, int(MARGIN * (model + audit))), t2.base


def _line(b1: int, b2: int, p1: int, p2: int, p: int) -> float:
    """The line through ``(p1, b1)`` and ``(p2, b2)`` at ``p``, never falling (bytes do not shrink with pixels)."""
    return b1 + max(b2 - b1, 0) / (p2 - p1) * (p - p1)


def _measure(adapter: Any, y: torch.Tensor, sampling: Any, device: torch.device, traced: bool = True) -> _Pass:
    """One pass of ``y``'s K samples under the scan's tracer, or bare (its calls counted) unless ``traced``."""
    from ..tracing.trace import Tracer
    from .passes import spatial_sites

    y = y.to(device)
    latents = sampling.latents(adapter, y, 0, 0, device)
    tracer = Tracer(sampling, spatial=spatial_sites(adapter)) if traced else None  # large rows kept as windows
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        live = LiveTensors(record=True)
        with live if tracer is None else contextlib.nullcontext():  # only a bare pass's calls are extrapolated
            adapter.sample(sampling.repeat(y), latents, observer=tracer)
        if tracer is not None:
            tracer.end_batch(1)
        torch.cuda.synchronize(device)
        used = torch.cuda.max_memory_allocated(device) - base
        return _Pass(used, used, base, live.calls_)
    one = _pass_parts(lambda: adapter.sample(sampling.repeat(y), latents, observer=tracer), record=tracer is None)
    if tracer is not None:
        tracer.end_batch(1)
    return one


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
