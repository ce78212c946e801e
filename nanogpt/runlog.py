"""
Where a training run's numbers go, so people can see how it stands:

- out_dir/metrics.jsonl  one JSON object per logged iteration or evaluation, appended
- out_dir/loss.png       train and val loss against iterations, redrawn at each evaluation
- wandb                  the same numbers, when wandb_log=True (WANDB_MODE=offline works)

Only the master process of a distributed run makes a RunLog.
"""

import json
import os

from nanogpt.atomic import atomic_write, could_not_write
from nanogpt.errors import UserError


class RunLog:
    """resume=False: a new run, whose first record replaces the metrics.jsonl of any earlier run
    in out_dir (and only then: a run that fails before its first record leaves it as it was);
    resume=True appends to it. Nothing is written, and wandb not started, before that record."""

    def __init__(self, out_dir, wandb_config=None, resume=False):
        self.out_dir = out_dir
        self.metrics_path = os.path.join(out_dir, "metrics.jsonl")
        self.plot_path = os.path.join(out_dir, "loss.png")
        self.started = resume
        self.wandb_config, self.wandb = wandb_config, None

    def log(self, record):
        """Append one record, e.g. {"iter": 10, "loss": 2.3, "lr": 1e-3}."""
        line = (json.dumps(record) + "\n").encode("utf-8")
        if not self.started:
            os.makedirs(self.out_dir, exist_ok=True)
            atomic_write(self.metrics_path, lambda f: f.write(line))  # the old run's goes now
            self.started = True
        else:
            self.append(line)
        if self.wandb_config is not None and self.wandb is None:
            import wandb  # only needed when asked for
            project, name, config = self.wandb_config
            self.wandb = wandb.init(project=project, name=name, config=config, dir=self.out_dir)
        if self.wandb is not None:
            self.wandb.log(record, step=record["iter"])
        if "val_loss" in record or "hellaswag_acc_norm" in record:
            self.plot()

    def append(self, line):
        """Add a line to metrics.jsonl; one that cannot be written whole (a full disk) is taken
        back, so the file keeps whole lines only."""
        with open(self.metrics_path, "ab") as f:
            size = f.tell()
            try:
                f.write(line)
                f.flush()
            except OSError as e:
                f.truncate(size)
                raise UserError(could_not_write(self.metrics_path, e)) from None

    def read(self):
        with open(self.metrics_path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    def plot(self):
        # a Figure of its own, drawn to a file by the Agg canvas: no screen, no pyplot state
        from matplotlib.figure import Figure

        records = self.read()
        steps = [r for r in records if "loss" in r]
        evals = [r for r in records if "val_loss" in r]
        fig = Figure(figsize=(7, 4), dpi=100)
        ax = fig.subplots()
        ax.plot([r["iter"] for r in steps], [r["loss"] for r in steps],
                color="tab:blue", alpha=0.35, linewidth=0.8, label="train (batch)")
        ax.plot([r["iter"] for r in evals], [r["train_loss"] for r in evals],
                color="tab:blue", marker="o", markersize=3, label="train (eval)")
        ax.plot([r["iter"] for r in evals], [r["val_loss"] for r in evals],
                color="tab:orange", marker="o", markersize=3, label="val")
        ax.set_xlabel("iteration")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left")
        scored = [r for r in records if "hellaswag_acc_norm" in r]
        if scored:  # a score on its own axis, on the right
            ax2 = ax.twinx()
            ax2.plot([r["iter"] for r in scored], [r["hellaswag_acc_norm"] for r in scored],
                     color="tab:green", marker="s", markersize=3, label="HellaSwag acc_norm")
            ax2.set_ylabel("HellaSwag acc_norm")
            ax2.legend(loc="upper right")
        fig.tight_layout()
        atomic_write(self.plot_path, lambda f: fig.savefig(f, format="png"))

    def finish(self):
        if self.wandb is not None:
            self.wandb.finish()
