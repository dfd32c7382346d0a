"""What a run reports: `metrics.jsonl` (one JSON object per line), its plot, a progress bar.

Training records hold `step`, `epoch`, `loss`, `lr`, `grad_norm`, `context`, `ctc_only`,
`utterances`, `skipped` and `elapsed_s`; validation records hold `step`, `val` (the rates
of `caster.train.evaluate.error_rates`) and `decoder` ("transducer", or "ctc": the
training-only CTC head decoded greedily, up to the last of `model.ctc_only_steps`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "metrics.png"


def write_metrics(path: Path, record: dict[str, Any]) -> None:
    """Append one record."""
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every record, oldest first; none when the file does not exist."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def plot_metrics(records: Sequence[dict[str, Any]], path: Path) -> bool:
    """Training loss and validation error rates over steps, as a PNG.

    Returns:
        False (and nothing is written) when matplotlib is not installed.
    """
    try:
        import matplotlib
    except ImportError:
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, wer_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    train = [r for r in records if "loss" in r]
    loss_ax.plot([r["step"] for r in train], [r["loss"] for r in train])
    loss_ax.set(xlabel="step", ylabel="RNN-T loss", title="training loss", yscale="log")
    val = [r for r in records if "val" in r]
    # Pooled error rates only (language identification accuracy has its own scale).
    pooled = sorted({k for r in val for k in r["val"] if "/all/" in k and not k.endswith("/lid")})
    for key in pooled:
        points = [(r["step"], r["val"][key]) for r in val if key in r["val"]]
        wer_ax.plot(*zip(*points, strict=True), marker="o", label=key)
    wer_ax.set(xlabel="step", ylabel="error rate", title="validation")
    if pooled:
        wer_ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the records up to `step`: drop what an interrupted run logged after its state."""
    kept = [r for r in read_metrics(path) if r["step"] <= step]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def set_postfix(self, **values: str) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, initial: int, enabled: bool) -> Any:
    """A tqdm bar, or a silent stand-in when disabled or tqdm is not installed."""
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        logger.warning("no progress bar: tqdm is not installed (caster[train])")
        return _NoBar()
    return tqdm(total=total, initial=initial, dynamic_ncols=True)
