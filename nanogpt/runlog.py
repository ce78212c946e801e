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


# the numbers of a record that the plot draws
PLOTTED = ("loss", "train_loss", "val_loss", "hellaswag_acc_norm")


class RunLog:
    """resume=False: a new run, whose first record replaces the metrics.jsonl of any earlier run
    in out_dir (and only then: a run that fails before its first record leaves it as it was);
    resume=True appends to it, once it is checked (check_resumable). Nothing is written, and
    wandb not started, before that record."""

    def __init__(self, out_dir, wandb_config=None, resume=False):
        self.out_dir = out_dir
        self.metrics_path = os.path.join(out_dir, "metrics.jsonl")
        self.plot_path = os.path.join(out_dir, "loss.png")
        self.started = resume
        self.wandb_config, self.wandb = wandb_config, None
        if resume:
            self.check_resumable()

    def check_resumable(self):
        """Refuse, before a resumed run trains, a metrics.jsonl it cannot go on: a link (the run
        would append wherever it leads, outside out_dir), something not a file, or a line that
        is not a record, which drawing the plot at the next evaluation would fail on."""
        path = self.metrics_path
        if os.path.islink(path):
            raise UserError(f"{path} is a link (to {os.readlink(path)}): a run appends its metrics "
                            "to a file of its own in out_dir; put the file in place of the link")
        if os.path.lexists(path) and not os.path.isfile(path):
            raise UserError(f"{path} is not a file: a run appends its metrics to a file there; "
                            "move it away")
        if os.path.exists(path):
            self.read()

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
        """The records of metrics.jsonl; a line that is not one (an edit, a disk that failed
        part way through a line) is a UserError naming it."""
        records = []
        with open(self.metrics_path, "rb") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except (ValueError, RecursionError):  # not JSON, not UTF-8, nested too deep
                    record = None
                if not is_record(record):
                    raise UserError(f"{self.metrics_path}, line {n}: not a record of a run (a JSON "
                                    f"object with its iter and numbers): "
                                    f"{line.decode('utf-8', 'replace').strip()[:60]!r}; mend or "
                                    "delete that line (the run's checkpoint does not need it)")
                records.append(record)
        return records

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


def is_record(record):
    """Whether record is one that RunLog.log writes: a dict with an int iter whose plotted
    values are numbers (an evaluation's val_loss with its train_loss)."""
    return (isinstance(record, dict) and type(record.get("iter")) is int
            and all(type(record[k]) in (int, float) for k in PLOTTED if k in record)
            and ("val_loss" not in record or "train_loss" in record))
