"""Peak memory of ``flowaudit scan`` against the number of inputs: it should stay flat.

Each scan runs in its own process, started by a fresh watcher process that reads the scan's peak resident set
size with ``resource.getrusage(RUSAGE_CHILDREN)``, so no run inherits another's peak. Conditions: LR images of
32×32 (the bundled SR test tiles, bicubic ×4, cycled), SR ×4 → 128×128 samples, K = 10, one thread.

Goal: peak RSS with 10× the inputs ≤ 1.1× the peak with 1×, in exact passes (the default) and in batched passes
sized by ``--max-memory``. A batched ratio is given only where the smaller run fills one batch: with fewer samples
than a batch its passes are smaller, and the ratio would measure the batch, not what grows with the inputs. Run::

    python benchmarks/bench_memory.py [--model sr-affine] [--inputs 20 200] [--max-memory 2GB] [--modes exact batched]
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

K = 10  # samples per input

WATCH = """
import resource, subprocess, sys, json
rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
print(json.dumps({"rc": rc.returncode, "peak": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
                  "err": rc.stderr.decode()[-400:]}))
"""


def conditions(n: int, size: int, path: Path) -> Path:
    import numpy as np
    import torch

    from flowaudit.demo import demo_sets

    lr = demo_sets("sr")[1].y
    up = torch.nn.functional.interpolate(lr, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    y = up[torch.arange(n) % len(up)]
    out = path / f"lr{n}.npy"
    np.save(out, y.numpy().astype("float32"))
    return out


def scan(model: str, data: Path, out: Path, extra: list[str]) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "flowaudit",
        "-q",
        "scan",
        model,
        "--data",
        str(data),
        "--out",
        str(out),
        "-k",
        str(K),
        "--device",
        "cpu",
        *extra,
    ]
    env = {
        **os.environ,
        "PYTHONSAFEPATH": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }  # the installed flowaudit
    t = time.perf_counter()
    res = json.loads(
        subprocess.run([sys.executable, "-c", WATCH, *cmd], env=env, capture_output=True, text=True, check=True).stdout
    )
    res["wall_s"] = time.perf_counter() - t
    if res["rc"] != 0:
        raise SystemExit(f"scan failed ({res['rc']}): {res['err']}")
    settings = json.loads((out / "report.json").read_text())["settings"]
    res.update({k: settings.get(k) for k in ("batch_size", "max_memory_bytes", "peak_rss_bytes")})
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="sr-affine")
    ap.add_argument("--inputs", type=int, nargs=2, default=[20, 200])
    ap.add_argument("--size", type=int, default=32, help="LR side")
    ap.add_argument("--max-memory", default="2GB", help="budget of the batched runs")
    ap.add_argument("--modes", nargs="+", default=["exact", "batched"], choices=["exact", "batched"])
    args = ap.parse_args()
    modes = {"exact": [], f"batched, --max-memory {args.max_memory}": ["--batched", "--max-memory", args.max_memory]}
    modes = {k: v for k, v in modes.items() if k.split(",")[0] in args.modes}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = {n: conditions(n, args.size, tmp) for n in args.inputs}
        print(f"{args.model}, LR {args.size}×{args.size}, K = {K}, 1 thread")
        print(f"{'mode':<32} {'inputs':>6} {'peak RSS (MB)':>14} {'report peak':>12} {'batch':>6} {'wall (s)':>9}")
        for mode, extra in modes.items():
            peaks, batches = [], []
            for n in args.inputs:
                r = scan(args.model, data[n], tmp / f"out-{len(peaks)}-{mode[:5]}", extra)
                peaks.append(r["peak"])
                batches.append(r["batch_size"])
                print(
                    f"{mode:<32} {n:>6} {r['peak'] / 1e6:>14.0f} {r['peak_rss_bytes'] / 1e6:>12.0f} "
                    f"{r['batch_size']:>6} {r['wall_s']:>9.1f}"
                )
            if args.inputs[0] * K < max(batches):
                print(
                    f"{'':<32} {'ratio':>6} {'none':>14}  (the {args.inputs[0]} inputs' {args.inputs[0] * K} samples "
                    f"do not fill a batch of {max(batches)}: raise --inputs)"
                )
                continue
            ratio = peaks[1] / peaks[0]
            print(f"{'':<32} {'ratio':>6} {ratio:>14.3f}  (goal ≤ 1.10: {'met' if ratio <= 1.1 else 'NOT met'})")


if __name__ == "__main__":
    main()
