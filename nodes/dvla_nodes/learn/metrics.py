"""``metrics.jsonl`` (one JSON object per line, flushed as written) and the success-curve PNG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsLog:
    """Append-only JSON-lines log. Each record carries a ``kind`` (``bc``, ``train``, ``eval``,
    ``final``) and the wall time ``t`` in seconds since the run started."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (owned, closed in close())

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_success(records: list[dict[str, Any]], out: Path, title: str = "") -> Path:
    """Success rate of the evaluations against wall time and against environment steps, per
    task and the mean; written to ``out`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = [r for r in records if r.get("kind") in ("eval", "final")]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    if evals:
        tasks = sorted(evals[-1]["success_by_task"])
        for x_key, ax, label in (
            ("t", axes[0], "wall time (min)"),
            ("env_steps", axes[1], "environment steps"),
        ):
            xs = [r[x_key] / (60.0 if x_key == "t" else 1.0) for r in evals]
            for task in tasks:
                ys = [r["success_by_task"].get(task, float("nan")) for r in evals]
                ax.plot(xs, ys, lw=1, alpha=0.6, label=task)
            ax.plot(xs, [r["success"] for r in evals], "k-o", lw=2.5, ms=3, label="mean")
            ax.set_xlabel(label)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("success rate (held-out seeds)")
        axes[1].legend(fontsize=7, loc="lower right")
    axes[0].set_ylim(-0.02, 1.02)
    fig.suptitle(title or "dvla: success rate")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
