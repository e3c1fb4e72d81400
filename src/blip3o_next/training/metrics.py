"""The metrics log of a run: metrics.csv, TensorBoard scalars and PNGs of the curves."""

from __future__ import annotations

import csv
from pathlib import Path


class MetricsLog:
    """metrics.csv and TensorBoard scalars (main process only), and a PNG of the loss curves."""

    def __init__(self, out: Path, enabled: bool):
        self.out, self.enabled = out, enabled
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))

    def add(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        path = self.out / "metrics.csv"
        rows = self._rows()
        rows = [r for r in rows if int(r["step"]) < step] + [{"step": step, **values}]  # a resumed run rewrites its tail
        keys = ["step"] + sorted({k for r in rows for k in r} - {"step"})
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def _rows(self) -> list[dict]:
        path = self.out / "metrics.csv"
        if not path.is_file():
            return []
        with open(path) as f:
            return list(csv.DictReader(f))

    def plot(self, filename: str = "loss_curves.png", keys: list[str] | None = None, log_scale: bool = True, title: str = "training losses") -> None:
        """A PNG of the logged `keys` over steps (default: every column but lr and throughput)."""
        if not self.enabled:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self._rows()
        if not rows:
            return
        keys = keys or [k for k in rows[0] if k not in ("step", "lr", "samples_per_s")]
        fig, ax = plt.subplots(figsize=(7, 4))
        steps = [int(r["step"]) for r in rows]
        for k in keys:
            ax.plot(steps, [float(r[k]) if r.get(k) not in (None, "") else float("nan") for r in rows], label=k)
        ax.set_xlabel("step")
        if log_scale:
            ax.set_yscale("log")
        ax.legend()
        ax.set_title(title)
        fig.tight_layout()
        fig.savefig(self.out / filename, dpi=100)
        plt.close(fig)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
