"""Full-size official checkpoints: flowaudit against the authors' own code, in one run.

Needs the official repository beside you (SRFlow, NCSR or LLFlow: ``--code`` is its ``code/`` folder, the one that
holds ``models/`` and ``options/``), a checkpoint it wrote (``--weights``) and the option file it was trained with
(``--options``). The official code is imported from ``--code`` only, in its own process; nothing of it is kept.

Each arm runs in a fresh process, so its peak is its own (``ru_maxrss``; on CUDA also
``torch.cuda.max_memory_allocated``):

1. *latents*: flowaudit's adapter draws the scan's seeded latents for every input (the same generator seeds as
   ``flowaudit scan --seed``), converts them with ``adapter.to_official_latents`` and writes them to the work
   folder; on the first input it checks that the official network and the adapter give the same samples for them.
2. *official*: the official network (built by ``models.networks.define_Flow`` from the option file, weights loaded
   strictly) samples every input's K latents in one batch, as ``net(lr=…, reverse=True, eps_std=τ, epses=…)``.
   Timed: the network calls only.
3. *fit*: ``flowaudit fit`` on the fit images; 4. *scan*: ``flowaudit scan`` on the scan images, same seed, K and
   τ, with the fit's statistics; 5. *inspect*: ``flowaudit inspect``. Timed: the whole command, after imports.
   The scan also counts its ``adapter.sample`` calls by (samples, condition side): the passes it runs at the
   data's size beside its own one per input.

With ``--side-by-side`` the official arm runs beside fit and scan, each on its own ``--threads`` cores: the
sizes of the goal take hours an arm on a small CPU host, and both arms then share the host's memory bandwidth
alike. Use ``--clock cpu`` with it.

Ratios and goals: scan / official time ≤ 1.15, scan / official peak ≤ 1.3, inspect ≤ 30 s, inspect's peak above
the process baseline (Python and torch imported) ≤ 3 × the checkpoint's size. Run::

    python benchmarks/bench_official.py --code SRFlow/code --weights SRFlow_DF2K_4X.pth \\
        --options SRFlow/code/confs/SRFlow_DF2K_4X.yml [--lr FOLDER | --lr generated] [--fit-images 64] \\
        [--scan-images 16] [--lr-size 160] [--samples 10] [--device cpu|cuda] [--threads N] [--clock wall|cpu] \\
        [--side-by-side]

``--lr generated`` crops the bundled corpus images (darkened for LLFlow); a folder's PNG/JPEG images are
centre-cropped to ``--lr-size``. Modules the official ``utils.util`` imports but the networks never call
(``natsort``, ``cv2``, ``torchvision``) are stubbed only where they are not installed, and the run says so.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FAMILIES = {"SRFlowNet": "srflow", "NCSRNet": "ncsr", "LLFlow": "llflow"}
GOALS = {"time": 1.15, "peak": 1.3, "inspect_s": 30.0, "inspect_mem": 3.0}
STUBBED = ("natsort", "cv2", "torchvision")


# -- helpers run inside the child processes -----------------------------------------------------------------------
def _rss_now() -> int:
    """Resident set size of this process now, bytes (Linux ``/proc``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _peak() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _Clock:
    """Wall and process-CPU seconds together; ``sync`` waits for the device before each reading."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.wall = self.cpu = 0.0

    def _sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def __enter__(self) -> _Clock:
        self._sync()
        self._w, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self._sync()
        self.wall += time.perf_counter() - self._w
        self.cpu += time.process_time() - self._c


def _stub_missing() -> list[str]:
    """Empty stand-ins for modules the official ``utils.util`` imports but the networks never call."""
    import importlib.util
    import types

    def refuse(*_a: object, **_k: object) -> None:
        raise RuntimeError("stubbed by bench_official.py: install the real module to use this")

    stubbed = []
    for name in STUBBED:
        if importlib.util.find_spec(name) is not None:
            continue
        mod = types.ModuleType(name)
        mod.natsorted = sorted  # natsort
        sys.modules[name] = mod
        if name == "torchvision":
            utils = types.ModuleType("torchvision.utils")
            utils.make_grid = utils.save_image = refuse
            mod.utils = utils
            sys.modules["torchvision.utils"] = utils
        stubbed.append(name)
    return stubbed


def official_options(code: str, options: str) -> dict:
    """The option dict as the official test script reads it: ``options.parse`` then ``dict_to_nonedict``."""
    sys.path.insert(0, str(Path(code).resolve()))
    import contextlib
    import io

    import options.options as option  # noqa: PLC0415 - the official code, from --code only

    with contextlib.redirect_stdout(io.StringIO()):  # parse prints the training schedule
        opt = option.parse(options, is_train=False)
    return option.dict_to_nonedict(opt) if hasattr(option, "dict_to_nonedict") else opt


def official_network(code: str, options: str, weights: str, device: str):
    """``(net, family, opt)``: the official network from the option file, the checkpoint loaded strictly, eval."""
    import warnings

    import torch

    opt = official_options(code, options)
    from models import networks  # noqa: PLC0415 - the official code

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LLFlow's deprecated autocast decorator on CPU
        net = networks.define_Flow(opt, step=0)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and not any(k.startswith("RRDB.") for k in state):
        state = state["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    net.load_state_dict(state, strict=True)
    del state
    family = FAMILIES.get(opt["network_G"]["which_model_G"])
    if family is None:
        raise SystemExit(f"bench_official: unsupported official network {opt['network_G']['which_model_G']!r}")
    return net.eval().to(device), family, opt


def official_sample(net, family: str, lr, epses: list, temperature: float):
    """The official network's own sampling of explicit latents (``epses``, split first, top latent last)."""
    import torch

    kw = {"std": torch.zeros(lr.shape[0], 1, 1, 1, device=lr.device)} if family == "ncsr" else {}
    out = net(lr=lr, z=None, eps_std=temperature, reverse=True, epses=list(epses), **kw)
    return out[0] if isinstance(out, tuple) else out


def _role_prepare(a: dict) -> dict:
    """Write the fit and scan conditions (N×3×S×S float32 in [0, 1]) to the work folder."""
    import numpy as np

    s = a["lr_size"]
    if a["lr"] == "generated":
        from flowaudit.reference_models import data as d

        images = list(d.corpus("test")) + list(d.corpus("train"))
        if a["family"] == "llflow":  # low-light conditions: the bundled LOL-like darkening
            images = [(n, low) for n, low, _ in d.lowlight_pairs(images, d.LOL_LIKE, seed=0)]
    else:
        from flowaudit.io.images import read_image_folder

        images = read_image_folder(a["lr"])
    crops = []
    for _, img in images:  # H×W×3
        h, w = img.shape[:2]
        if h < s or w < s:
            continue
        for top in range(0, h - s + 1, s):
            for left in range(0, w - s + 1, s):
                crops.append(np.ascontiguousarray(img[top : top + s, left : left + s].transpose(2, 0, 1)))
    need = max(a["fit_images"], a["scan_images"])
    if len(crops) < need:
        raise SystemExit(f"bench_official: {len(crops)} crops of {s}×{s} in {a['lr']}, need {need}")
    rng = np.random.default_rng(0)
    order = rng.permutation(len(crops))
    stack = np.stack([crops[i] for i in order]).astype(np.float32).clip(0, 1)
    np.save(Path(a["work"]) / "fit.npy", stack[: a["fit_images"]])
    np.save(Path(a["work"]) / "scan.npy", stack[len(stack) - a["scan_images"] :])  # disjoint where there are enough
    return {"crops": len(crops)}


def _role_latents(a: dict) -> dict:
    """The scan's seeded latents as official ``epses``, one file per input, and the same-latent check."""
    import numpy as np
    import torch

    torch.set_num_threads(a["threads"])
    stubbed = _stub_missing()
    from flowaudit.adapters import load_model

    from flowaudit.config.sampling import Sampling

    adapter = load_model(a["weights"], official_config=a["options"])
    net, family, _ = official_network(a["code"], a["options"], a["weights"], "cpu")
    y = torch.from_numpy(np.load(Path(a["work"]) / "scan.npy"))
    sampling = Sampling(a["samples"], a["temperature"], a["seed"])
    check = {}
    with torch.no_grad():
        for i in range(len(y)):
            rows = sampling.repeat(y[i : i + 1])
            latents = sampling.latents(adapter, y[i : i + 1], 0, i, torch.device("cpu"))  # set 0: the --data set
            epses = adapter.to_official_latents(rows, latents)
            if family == "llflow":  # the official loader's 6 channels: log image and equalised histogram
                from flowaudit.reference_models.lowlight import llflow_input

                cond = llflow_input(y[i : i + 1])
            else:
                cond = y[i : i + 1]
            torch.save({"lr": cond, "epses": epses}, Path(a["work"]) / f"latents-{i}.pt")
            if i < a["check_inputs"]:
                ours = adapter.sample(rows, latents)
                theirs = official_sample(net, family, cond.repeat_interleave(a["samples"], 0), epses, a["temperature"])
                fin = torch.isfinite(theirs) & torch.isfinite(ours)
                diff = float((ours - theirs)[fin].abs().max() / theirs[fin].abs().max().clamp_min(1e-12))
                check = {
                    "max_rel_diff": max(diff, check.get("max_rel_diff", 0.0)),
                    "nonfinite_official": int((~torch.isfinite(theirs)).sum()) + check.get("nonfinite_official", 0),
                    "nonfinite_ours": int((~torch.isfinite(ours)).sum()) + check.get("nonfinite_ours", 0),
                    "same_nonfinite": bool(torch.equal(torch.isfinite(theirs), torch.isfinite(ours)))
                    and check.get("same_nonfinite", True),
                    "max_abs_official": float(theirs[torch.isfinite(theirs)].abs().max())
                    if bool(torch.isfinite(theirs).any())
                    else float("nan"),
                }
    return {
        "family": family,
        "stubbed": stubbed,
        "check": check,
        "parameters": sum(p.numel() for p in net.parameters()),
    }


def _role_official(a: dict) -> dict:
    """The official network's own sampling of every input's K latents, one batch per input."""
    import torch

    torch.set_num_threads(a["threads"])
    base = _rss_now()
    _stub_missing()
    cuda = a["device"].startswith("cuda")
    net, family, _ = official_network(a["code"], a["options"], a["weights"], a["device"])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    clock = _Clock(a["device"])
    for i in range(a["scan_images"]):
        got = torch.load(Path(a["work"]) / f"latents-{i}.pt", weights_only=True)
        lr = got["lr"].to(a["device"]).repeat_interleave(a["samples"], 0)
        epses = [e.to(a["device"]) for e in got["epses"]]
        del got
        with clock:
            x = official_sample(net, family, lr, epses, a["temperature"])
        del x, lr, epses
    out = {"wall": clock.wall, "cpu": clock.cpu, "peak": _peak(), "baseline": base}
    if cuda:
        out["cuda_peak"] = torch.cuda.max_memory_allocated()
    return out


def _role_cli(a: dict) -> dict:
    """One flowaudit command in this process, timed after imports; peak RSS above the post-``import torch`` RSS."""
    import torch

    base = _rss_now()
    from flowaudit.cli.main import cli

    cuda = a["device"].startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    clock = _Clock(a["device"] if cuda else "cpu")
    code = 0
    calls = _count_sample_calls()
    with clock:
        try:
            cli.main(args=a["argv"], prog_name="flowaudit")
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    out = {"wall": clock.wall, "cpu": clock.cpu, "peak": _peak(), "baseline": base, "rc": code}
    out["sample_calls"] = {"x".join(map(str, k)): v for k, v in sorted(calls.items())}
    if cuda:
        out["cuda_peak"] = torch.cuda.max_memory_allocated()
    return out


def _count_sample_calls() -> dict:
    """Count every outermost ``adapter.sample`` call by (samples, condition side): each adapter class's own
    ``sample`` is wrapped, a call from inside another (``super().sample``) is not counted again."""
    import flowaudit.adapters.official  # noqa: F401  (the classes to wrap, before the command loads them)
    from flowaudit.adapters import Adapter

    calls: dict = {}
    depth = [0]

    def wrap(fn):
        def sample(self, y, *args, **kwargs):
            if depth[0] == 0:
                key = (int(y.shape[0]), int(y.shape[-1]))
                calls[key] = calls.get(key, 0) + 1
            depth[0] += 1
            try:
                return fn(self, y, *args, **kwargs)
            finally:
                depth[0] -= 1

        return sample

    todo = [Adapter]
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        if "sample" in cls.__dict__:
            cls.sample = wrap(cls.__dict__["sample"])
    return calls


ROLES = {"prepare": _role_prepare, "latents": _role_latents, "official": _role_official, "cli": _role_cli}


# -- the parent: runs each arm in a fresh process ------------------------------------------------------------------
def _start(role: str, spec: dict) -> subprocess.Popen:
    """Start the arm ``role`` in a fresh process (read its figures with :func:`_figures`)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "MKL_NUM_THREADS": str(spec["threads"])}
    cmd = [sys.executable, __file__, "--role", role, "--spec", json.dumps(spec)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _figures(p: subprocess.Popen, role: str) -> dict:
    """The figures the arm ``role`` printed, once its process ends, with the last line it wrote to stderr
    (``message``, where it wrote one: why a flowaudit command failed); a failed arm ends the benchmark."""
    out, err = p.communicate()
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    said = err.strip().splitlines()
    if p.returncode != 0 or not lines:
        why = said[-1] if said else "(no message)"
        raise SystemExit(f"bench_official: the {role} arm failed (exit {p.returncode}): {why}")
    return {**json.loads(lines[-1]), **({"message": said[-1]} if said else {})}


def _child(role: str, spec: dict) -> dict:
    return _figures(_start(role, spec), role)


def _flowaudit(spec: dict, argv: list[str]) -> dict:
    out = _child("cli", {**spec, "argv": argv})
    if out["rc"] not in (0, 1):  # 1: the audit found what --fail-on asks for (never here); anything else failed
        command, why = next(x for x in argv if not x.startswith("-")), out.get("message", "(no message)")
        raise SystemExit(f"bench_official: flowaudit {command} exited {out['rc']}: {why}")
    return out


def _official(p: subprocess.Popen, clock: str) -> dict:
    """The official arm's figures, once it ends, printed."""
    off = _figures(p, "official")
    print(f"official sampling: {off[clock]:.1f} s ({clock}), peak {_mib(off['peak'])}", flush=True)
    return off


def _mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def _verdict(value: float, goal: float) -> str:
    return "met" if value <= goal else "missed"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--code", help="the official repository's code folder (holds models/ and options/)")
    ap.add_argument("--weights", help="the official checkpoint (.pth, a state_dict as the official code saves it)")
    ap.add_argument("--options", help="the option file (.yml) the checkpoint was trained with")
    ap.add_argument("--lr", default="generated", help="a folder of LR images, or 'generated' (bundled corpus crops)")
    ap.add_argument("--fit-images", type=int, default=64)
    ap.add_argument("--scan-images", type=int, default=16)
    ap.add_argument("--lr-size", type=int, default=160, help="side of the square LR conditions")
    ap.add_argument("--samples", "-k", type=int, default=10, help="samples K per input")
    ap.add_argument("--temperature", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="cpu: process CPU time (loaded hosts)")
    ap.add_argument("--check-inputs", type=int, default=1, help="inputs on which the samples are compared")
    ap.add_argument("--work", help="folder for the conditions, latents and reports (default: a temporary one)")
    ap.add_argument("--skip", default="", help="comma-separated arms to leave out: fit, inspect")
    ap.add_argument(
        "--side-by-side",
        action="store_true",
        help="run the official arm beside fit and scan (needs 2 × --threads cores and both peaks in memory)",
    )
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON object at the end")
    ap.add_argument("--role", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def _check_args(a: argparse.Namespace) -> None:
    problems = []
    for flag in ("code", "weights", "options"):
        if getattr(a, flag) is None:
            problems.append(f"--{flag} is required")
    if a.code and not (Path(a.code) / "models" / "networks.py").is_file():
        problems.append(f"--code {a.code}: no models/networks.py there (pass the repository's code/ folder)")
    for flag in ("weights", "options"):
        if getattr(a, flag) and not Path(getattr(a, flag)).is_file():
            problems.append(f"--{flag} {getattr(a, flag)}: no such file")
    if a.lr != "generated" and not Path(a.lr).is_dir():
        problems.append(f"--lr {a.lr}: not a folder (or pass 'generated')")
    for flag in ("fit_images", "scan_images", "lr_size", "samples", "threads"):
        if getattr(a, flag) < 1:
            problems.append(f"--{flag.replace('_', '-')} must be ≥ 1")
    if problems:
        print(f"bench_official: {problems[0]}", file=sys.stderr)
        raise SystemExit(2)


def _fit_and_scan(a: argparse.Namespace, spec: dict, skip: set[str], common: list[str]) -> tuple[dict | None, dict]:
    """The fit arm (unless skipped) and the scan arm, with the fit's statistics; their figures."""
    work = Path(spec["work"])
    stats = work / "stats.h5"
    fit = None
    if "fit" not in skip:
        stats.unlink(missing_ok=True)
        fit = _flowaudit(
            spec, ["-q", "fit", spec["weights"], "--data", str(work / "fit.npy"), "--out", str(stats)] + common
        )
        print(f"fit ({a.fit_images} images): {fit[a.clock]:.1f} s, peak {_mib(fit['peak'])}", flush=True)
    scan_argv = ["-q", "scan", spec["weights"], "--data", str(work / "scan.npy"), "--out", str(work / "report")]
    scan_argv += ["--overwrite", "-k", str(a.samples), "-t", str(a.temperature), "--seed", str(a.seed)] + common
    if fit is not None:
        scan_argv += ["--stats", str(stats)]
    scan = _flowaudit(spec, scan_argv)
    print(f"scan: {scan[a.clock]:.1f} s, peak {_mib(scan['peak'])}", flush=True)
    print(f"scan's adapter.sample calls (samples x condition side: calls): {scan['sample_calls']}", flush=True)
    return fit, scan


def main(argv: list[str] | None = None) -> None:
    a = parse(argv)
    if a.role:  # a child process
        print(json.dumps(ROLES[a.role](json.loads(a.spec))))
        return
    _check_args(a)
    skip = {s for s in a.skip.split(",") if s}
    work = Path(a.work or tempfile.mkdtemp(prefix="bench-official-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    spec = {
        "code": str(Path(a.code).resolve()),
        "weights": str(Path(a.weights).resolve()),
        "options": str(Path(a.options).resolve()),
        "lr": a.lr,
        "fit_images": a.fit_images,
        "scan_images": a.scan_images,
        "lr_size": a.lr_size,
        "samples": a.samples,
        "temperature": a.temperature,
        "seed": a.seed,
        "device": a.device,
        "threads": a.threads,
        "check_inputs": min(a.check_inputs, a.scan_images),
        "work": str(work),
        "family": None,
    }
    which = open(a.options).read()
    spec["family"] = "llflow" if "LLFlow" in which else "sr"
    print(f"work folder {work}", flush=True)
    _child("prepare", spec)
    lat = _child("latents", spec)
    chk = lat["check"]
    if lat["stubbed"]:
        print(f"stubbed (not installed, never called by the network): {', '.join(lat['stubbed'])}")
    print(
        f"{lat['family']}: {lat['parameters'] / 1e6:.1f} M parameters; same latents, official vs flowaudit samples "
        f"on {spec['check_inputs']} input(s) × K={a.samples}: max rel diff {chk['max_rel_diff']:.2e}, "
        f"non-finite {chk['nonfinite_official']} / {chk['nonfinite_ours']} (same positions: {chk['same_nonfinite']}), "
        f"max |x| {chk['max_abs_official']:.3g}",
        flush=True,
    )
    common = ["--official-config", spec["options"], "--device", a.device, "--threads", str(a.threads)]
    official = _start("official", spec)  # beside fit and scan with --side-by-side, else before them
    try:
        off = None if a.side_by_side else _official(official, a.clock)
        fit, scan = _fit_and_scan(a, spec, skip, common)
        off = off or _official(official, a.clock)
    finally:
        official.kill()  # ended already, unless fit or scan failed beside it
    ins = None
    if "inspect" not in skip:
        ins = _flowaudit(spec, ["-q", "inspect", spec["weights"], "--json"] + common)
    size = Path(a.weights).stat().st_size
    rows = [("scan / official time", scan[a.clock] / off[a.clock], GOALS["time"])]
    if a.device.startswith("cuda"):
        rows.append(("scan / official peak (CUDA allocated)", scan["cuda_peak"] / off["cuda_peak"], GOALS["peak"]))
    rows.append(("scan / official peak (RSS)", scan["peak"] / off["peak"], GOALS["peak"]))
    if ins is not None:
        rows.append(("inspect seconds", ins[a.clock], GOALS["inspect_s"]))
        rows.append(
            ("inspect peak above baseline / checkpoint", (ins["peak"] - ins["baseline"]) / size, GOALS["inspect_mem"])
        )
    print(
        f"\n{Path(a.weights).name} ({_mib(size)}), {a.scan_images} scan / {a.fit_images} fit images of "
        f"{a.lr_size}×{a.lr_size}, K={a.samples}, τ={a.temperature}, {a.device}, {a.threads} thread(s), {a.clock} clock"
        + (", official arm beside fit and scan" if a.side_by_side else "")
    )
    for name, value, goal in rows:
        print(f"  {name:<42} {value:8.3f}   goal ≤ {goal:g}: {_verdict(value, goal)}")
    if a.json:
        print(
            json.dumps(
                {
                    "check": chk,
                    "official": off,
                    "fit": fit,
                    "scan": scan,
                    "inspect": ins,
                    "size": size,
                    "ratios": {n: v for n, v, _ in rows},
                }
            )
        )


if __name__ == "__main__":
    main()
