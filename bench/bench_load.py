"""Time and peak memory to load the full-size 3.5 architecture on CPU.

Each measurement runs in a fresh subprocess (peak RSS is per process). The
baseline is the naive route: construct the model, then `torch.load` a
`torch.save`d state dict fully into memory and copy it in with
`load_state_dict`. Printed ratios are baseline / caster.

    python bench/bench_load.py [--preset nemotron-3.5-asr-streaming-0.6b] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
kind, path = sys.argv[1], sys.argv[2]
t1 = time.perf_counter()
if kind == "naive":
    from caster.transducer import Transducer
    import caster.presets as p
    net = Transducer(p.preset_config(sys.argv[3]))
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
else:
    import caster
    from caster.checkpoint import load_checkpoint
    from caster.train.export import export_nemo
    model = caster.load(path)
    net = model.net
# touch every weight so lazily mapped pages count
total = sum(float(p.detach().reshape(-1)[:: 4096].sum()) for p in net.parameters())
t2 = time.perf_counter()
# VmHWM is this program's own peak; ru_maxrss would also count the parent's peak at fork.
status = open("/proc/self/status").read()
peak_kb = int(status.split("VmHWM:")[1].split()[0])
print(json.dumps({"seconds": t2 - t1, "peak_rss_mb": peak_kb / 1024, "import_s": t1 - t0}))
"""


def measure(kind: str, path: Path, preset: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, kind, str(path), preset],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="nemotron-3.5-asr-streaming-0.6b")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()

    import caster
    from caster.checkpoint import load_checkpoint
    from caster.train.export import export_nemo

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        model = caster.load(f"preset:{args.preset}")
        build_s = time.perf_counter() - t
        model.save(tmp / "caster")
        checkpoint = load_checkpoint(tmp / "caster")
        export_nemo(checkpoint, tmp / "model.nemo")  # NVIDIA's layout, as the released files
        torch.save(model.net.state_dict(), tmp / "naive.pt")
        del model, checkpoint
        results = {
            "naive torch.load + load_state_dict": measure("naive", tmp / "naive.pt", args.preset),
            "caster.load (.nemo)": measure("caster", tmp / "model.nemo", args.preset),
            "caster.load (caster format)": measure("caster", tmp / "caster", args.preset),
        }
    base = results["naive torch.load + load_state_dict"]
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    lines = [
        f"# Load time and peak memory: {args.preset} (random weights, fp32)",
        "",
        f"Machine: {_cpu_name()}, {machine}; torch {torch.__version__}.",
        f"Building the preset with random init in-process: {build_s:.1f} s.",
        "",
        "| route | load s | peak RSS MB | speed-up vs naive | memory vs naive |",
        "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        speedup = base["seconds"] / r["seconds"]
        memory = r["peak_rss_mb"] / base["peak_rss_mb"]
        cells = [name, f"{r['seconds']:.2f}", f"{r['peak_rss_mb']:.0f}"]
        lines.append("| " + " | ".join([*cells, f"{speedup:.1f}x", f"{memory:.2f}"]) + " |")
    report = "\n".join(lines) + "\n"
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "load.md").write_text(report)
    (args.out / "load.json").write_text(json.dumps(results, indent=2) + "\n")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


if __name__ == "__main__":
    main()
