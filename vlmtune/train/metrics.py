"""Rank-0 metrics: metrics.jsonl (one object per optimizer step, flushed at once), TensorBoard, optional W&B,
a rich progress bar, a summary table and ``loss.png``.

On resume, metrics.jsonl is kept and cut back to the resumed step (lines of steps that were lost with the
process are dropped, so the file always has exactly one line per completed step).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All step records of a metrics.jsonl (a torn last line from a kill is ignored)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out


class MetricsLogger:
    """Writes step metrics on rank 0; a no-op elsewhere."""

    def __init__(self, output_dir: Path, *, enabled: bool, max_steps: int, start_step: int = 0,
                 tensorboard: bool = True, wandb: dict[str, Any] | None = None, log_every: int = 1,
                 plots: bool = True, show_progress: bool = True) -> None:
        """Args:
            log_every: TensorBoard / W&B scalars, and the console line when there is no progress bar, every N steps
                (and at max_steps); metrics.jsonl holds every step whatever N (resume and the curves read it).
            plots: write loss.png (train/eval loss and lr) at the end of the run.
            show_progress: a live progress bar (a terminal); without it, one console line per logged step.
        """
        if log_every < 1:
            raise ValueError(f"log_every={log_every}: must be >= 1")
        self.enabled = enabled
        self.log_every = log_every
        self.plots = plots
        self.max_steps = max_steps
        self.path = output_dir / "metrics.jsonl"
        self.output_dir = output_dir
        self.records: list[dict[str, Any]] = []
        self._tb = None
        self._wandb = None
        self._progress = None
        self.console = Console(stderr=True)
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= start_step]
        self.path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
        self.records = kept
        self._file = open(self.path, "a", buffering=1)  # noqa: SIM115 - closed in close()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(output_dir / "tensorboard"), purge_step=start_step + 1)
        if wandb and wandb.get("enabled"):
            import importlib

            try:
                wb = importlib.import_module("wandb")
            except ImportError as e:
                raise RuntimeError("logging.wandb.enabled is true but wandb is not installed: `pip install wandb` "
                                   "or set logging.wandb.enabled=false") from e
            self._wandb = wb.init(project=wandb.get("project"), name=wandb.get("run_name"), resume="allow")
        if show_progress:
            self._progress = Progress(TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                      TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                      console=self.console, transient=False)
            self._task = self._progress.add_task("train", total=max_steps, completed=start_step, info="")
            self._progress.start()
        self._t0 = time.time()

    def log_step(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()
        self.records.append(record)
        step = record["step"]
        if self._progress is not None:
            info = (f"loss {record['loss']:.4f} lr {record['lr']:.2e} "
                    f"tok/s {record.get('tokens_per_s', 0):.0f}")
            self._progress.update(self._task, completed=step, info=info)
        if step % self.log_every and step != self.max_steps:
            return
        if self._progress is None:
            self.console.print(f"step {step}/{self.max_steps}  loss {record['loss']:.4f}  lr {record['lr']:.3e}  "
                               f"grad_norm {record.get('grad_norm', float('nan')):.3g}  "
                               f"tok/s {record.get('tokens_per_s', 0):.0f}", highlight=False, soft_wrap=True)
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(f"train/{k}", v, step)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)

    def log_eval(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        rec = {"eval": True, **record}
        self._file.write(json.dumps(rec, sort_keys=True) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(f"eval/{k}", v, record["step"])

    def close(self) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.stop()
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()

    def summary(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Print a summary table of the run and write loss.png (logging.plots). Returns the summary dict."""
        if not self.enabled:
            return {}
        steps = [r for r in read_metrics(self.path) if not r.get("eval")]
        if not steps:
            return {}
        summ = {
            "steps": steps[-1]["step"],
            "first_loss": steps[0]["loss"],
            "final_loss": steps[-1]["loss"],
            "mean_tokens_per_s": sum(r.get("tokens_per_s", 0) for r in steps) / len(steps),
            "mean_padding_fraction": sum(r.get("padding_fraction", 0) for r in steps) / len(steps),
            "wall_s": round(time.time() - self._t0, 1),
            **(extra or {}),
        }
        table = Table(title="vlmtune train summary")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for k, v in summ.items():
            table.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
        self.console.print(table)
        if self.plots:
            plot_loss(steps, self.output_dir / "loss.png")
        return summ


def plot_loss(records: list[dict[str, Any]], out: Path) -> None:
    """loss and lr against step, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["loss"] for r in records], label="train loss", color="tab:blue")
    evals = [r for r in records if r.get("eval_loss") is not None]
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss",
                color="tab:orange")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (token mean)")
    ax2 = ax.twinx()
    ax2.plot(steps, [r["lr"] for r in records], "--", color="tab:gray", label="lr")
    ax2.set_ylabel("learning rate")
    ax.legend(loc="upper right")
    ax.set_title("vlmtune training")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
