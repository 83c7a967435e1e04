"""Reports held for the end of a pass (audit overhead): :class:`~flowaudit.adapters.hooks.HeldReports`.

* held reports are made in call order, a call that cannot be held (an inference tensor) after the
  held ones, and once ``HOLD_BYTES`` are held; a held tensor written in place raises, naming the
  call; a pass that raises reports nothing it held;
* on every bundled flow (every coupling kind, and an FS-NCSR-style SR) — whose adapter claims their
  tensors stay intact — a traced pass gives the figures, bit for bit, of the same pass reported call
  by call, per pass and in an ``observing`` block, held to the pass's end or flushed mid-pass; and no
  tensor the hooks held was written in place (the flush checks every one).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from flowaudit.adapters.hooks import HeldReports
from torch import Tensor

from flowaudit.config.sampling import Sampling
from flowaudit.tracing.trace import Tracer


def _log(calls: list):
    def report(name, a, b):
        calls.append((name, a.clone(), None if b is None else b.clone()))

    return report


def test_held_reports_come_in_call_order_and_a_call_that_cannot_be_held_after_them():
    calls, late_calls = [], []
    held = HeldReports()
    a, b = torch.arange(4.0), torch.ones(2)
    assert held.hold(_log(calls), "a", a, b) and held.hold(_log(calls), "b", a * 2)
    assert calls == []  # nothing made yet
    with torch.inference_mode():
        late = a + 1
    assert not held.hold(_log(late_calls), "late", late)  # not held: the held ones are made first
    assert [c[0] for c in calls] == ["a", "b"] and late_calls == []
    held.hold(_log(calls), "c", a)
    held.flush()
    assert [c[0] for c in calls] == ["a", "b", "c"] and torch.equal(calls[1][1], a * 2) and calls[1][2] is None
    grad = torch.ones(3, requires_grad=True) * 2
    assert not held.hold(_log(calls), "in autograd", grad)


def test_held_reports_are_made_once_hold_bytes_are_held(monkeypatch):
    monkeypatch.setattr("flowaudit.adapters.hooks.HOLD_BYTES", 100)
    calls = []
    held = HeldReports()
    held.hold(_log(calls), "a", torch.zeros(20))  # 80 bytes
    assert calls == []
    held.hold(_log(calls), "b", torch.zeros(20))  # 160 > 100: both made
    assert [c[0] for c in calls] == ["a", "b"]


def test_a_held_tensor_written_in_place_raises():
    held = HeldReports()
    x, params = torch.zeros(3), torch.ones(3)
    held.hold(_log([]), "site s", x, params)
    params.mul_(2)
    with pytest.raises(RuntimeError, match="site s: a tensor held for its report was written in place"):
        held.flush()


def _bundled_flows():
    from flowaudit.reference_models import build
    from flowaudit.reference_models.couplings import KINDS

    tiny = dict(nf=8, nb=2, gc=4, hidden_channels=8)
    for kind in KINDS:
        yield f"toy-{kind}", build("toy", {"coupling": kind, "hidden": 8}), torch.randn(2, 2)
        yield (
            f"sr-{kind}",
            build("sr", {**tiny, "scale": 4, "L": 2, "K": 2, "patch": 16, "coupling": kind}),
            torch.rand(2, 3, 4, 4),
        )
        yield (
            f"lowlight-{kind}",
            build("lowlight", {**tiny, "L": 2, "K": 2, "patch": 16, "coupling": kind}),
            torch.rand(2, 3, 16, 16),
        )
    yield (
        "sr-ncsr",
        build(
            "sr",
            {**tiny, "scale": 4, "L": 2, "K": 2, "patch": 16, "residual": True, "std_channels": 3, "std_steps": [0, 1]},
        ),
        torch.rand(2, 3, 4, 4),
    )


def _all_state(t: Tracer) -> list:
    st = t.state()
    flat = [st["input_gain"]]
    for part in ("layers", "gains"):
        for name, v in sorted(st[part].items()):
            flat += [name, *(v.values() if isinstance(v, dict) else [v])]
    for name in sorted(t.reservoirs):
        flat += [name, t.reservoir_info(name), *t.reservoirs[name].kept()]
    return flat


def _equal(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(u, v) if isinstance(u, Tensor) else u == v for u, v in zip(a, b))


@pytest.mark.parametrize("hold_bytes", [16 << 20, 20_000], ids=["pass", "mid-pass"])
def test_bundled_flows_report_a_held_pass_as_they_report_it_call_by_call(hold_bytes, monkeypatch):
    """The claim behind holding (``tensors_stay_intact``), on every bundled flow: the same figures bit for bit
    as the pass reported call by call, per pass and in an ``observing`` block; no held tensor written in place."""
    from flowaudit.adapters import adapt

    monkeypatch.setattr("flowaudit.adapters.hooks.HOLD_BYTES", hold_bytes)
    for name, model, y in _bundled_flows():
        torch.manual_seed(0)
        for p in model.parameters():  # no zero-initialised output layer: every site non-trivial
            if p.dim() and not p.abs().sum():
                p.data.normal_(0, 0.05)
        a = adapt(model.eval())
        assert a.tensors_stay_intact, name
        y = y.repeat_interleave(4, 0)
        z = a.sample_latents(y, 0.9, torch.Generator().manual_seed(0))
        traced = []
        with torch.no_grad():
            for intact, block in ((True, False), (True, True), (False, False)):
                a.tensors_stay_intact = intact  # False: every call reported as it comes
                t = Tracer(Sampling(4, 0.9, 0))
                with a.observing(t) if block else contextlib.nullcontext():
                    a.sample(y, z, observer=t)
                    t.end_batch(2)
                    a.sample(y[:4], [v[:4] for v in z], observer=t)
                    t.end_batch(1)
                traced.append(_all_state(t))
        del a.tensors_stay_intact
        assert len(traced[0]) > 10, name
        assert _equal(traced[0], traced[2]) and _equal(traced[1], traced[2]), name


def test_held_reports_are_made_when_the_pass_returns_and_dropped_if_it_raises():
    """Holding, the observer hears of a pass once it has returned (nothing of the audit runs between the model's
    layers); reported call by call, while it runs. A pass that raises after its layers reports nothing."""
    from flowaudit.adapters import adapt
    from flowaudit.reference_models import build

    a = adapt(
        build("sr", {"nf": 8, "nb": 2, "gc": 4, "hidden_channels": 8, "scale": 4, "L": 2, "K": 2, "patch": 16}).eval()
    )
    y = torch.rand(4, 3, 4, 4)
    z = a.sample_latents(y, 0.9, torch.Generator().manual_seed(0))
    running, reverse = [False], a.model.reverse

    def watched(*args, fail=False):
        running[0] = True
        try:
            out = reverse(*args)
        finally:
            running[0] = False
        if fail:
            raise RuntimeError("the pass failed after its layers")
        return out

    class Seen:
        def __init__(self):
            self.during = []

        def layer(self, name, x):
            self.during.append(running[0])

        def site(self, name, gain, params):
            self.during.append(running[0])

    with torch.no_grad():
        for intact in (True, False):
            a.tensors_stay_intact, a.model.reverse = intact, watched
            seen = Seen()
            with a.observing(seen):
                a.sample(y, z, observer=seen)
                one = len(seen.during)
                a.model.reverse = lambda *args: watched(*args, fail=True)
                with pytest.raises(RuntimeError, match="failed after its layers"):
                    a.sample(y, z, observer=seen)
                assert len(seen.during) == (one if intact else 2 * one)  # held: nothing of the failed pass
                a.model.reverse = watched
                a.sample(y, z, observer=seen)
            assert one > 10 and len(seen.during) == (2 if intact else 3) * one
            assert set(seen.during) == {not intact}


class _Count:
    def __init__(self, fail: bool = False):
        self.sites, self.layers, self.fail = 0, 0, fail

    def site(self, name, gain, params):
        if self.fail:
            raise ValueError("observer failed")
        self.sites += 1

    def layer(self, name, x):
        self.layers += 1


def _wrapped_modules(adapter) -> list[str]:
    return [n for n, m in adapter.model.named_modules() if "forward" in vars(m)]


def test_the_bundled_flows_forward_is_wrapped_only_while_observed_and_put_back():
    """The reference adapter wraps its modules' ``forward`` (:func:`~flowaudit.adapters.hooks.wrapped`), not
    forward hooks: nothing is left on the model after a pass, a block, a nested pass for another observer, or
    a pass whose observer raised; the bare pass is the same before and after."""
    from flowaudit.adapters import load_model

    torch.manual_seed(0)
    a = load_model("toy-affine")
    y = torch.randn(6, 2)
    z = a.sample_latents(y, 0.8, torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = a.sample(y, z)
        outer, inner = _Count(), _Count()
        with a.observing(outer):
            assert len(_wrapped_modules(a)) == len(a.sites()) + len(a.layer_names())
            a.sample(y, z, observer=outer)
            a.sample(y, z, observer=inner)  # another observer: wrapped again inside, put back after
            assert len(_wrapped_modules(a)) == len(a.sites()) + len(a.layer_names())
        assert _wrapped_modules(a) == []
        assert outer.sites == inner.sites == len(a.sites()) and outer.layers == inner.layers == len(a.layer_names())
        assert all(not m._forward_hooks and not m._forward_hooks_with_kwargs for m in a.model.modules())
        with pytest.raises(ValueError, match="observer failed"):  # raised when the held reports are made
            a.sample(y, z, observer=_Count(fail=True))
        assert _wrapped_modules(a) == []
        assert torch.equal(a.sample(y, z), before)


def test_wrapped_names_the_module_whose_call_failed_and_unwraps():
    from flowaudit.adapters.hooks import HookError, wrapped

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
    seen = []
    with wrapped(model, ["0", "1"], lambda name, args, kwargs, out: seen.append((name, out.shape))):
        model(torch.ones(3, 2))
    assert seen == [("0", (3, 2)), ("1", (3, 2))] and "forward" not in vars(model[0])

    def fail(name, args, kwargs, out):
        raise ValueError("boom")

    with pytest.raises(HookError, match="hook on '1' failed: boom"), wrapped(model, ["1"], fail):
        model(torch.ones(3, 2))
    assert all("forward" not in vars(m) for m in model)
