"""What the strip and anomaly trainers share: the schedule, checkpoints, the CSV log and the
learning-curve picture."""

from __future__ import annotations

import csv
from pathlib import Path

import torch


def run_training(body, cfg, *args):
    """Set threads and seeds from ``cfg.train``, join torchrun's process group (none for one
    process), call ``body(cfg, ctx, *args, t_start)`` and leave the group whatever happens."""
    import time

    from monai.utils import set_determinism

    from volseg.hpc import distributed as dist

    t_start = time.perf_counter()
    tc = cfg.train
    torch.set_num_threads(max(1, tc.threads))
    set_determinism(seed=tc.seed)
    ctx = dist.setup(tc.device)
    try:
        return body(cfg, ctx, *args, t_start)
    finally:
        dist.teardown(ctx)


def one_cycle(opt, lr: float, total: int):
    """Adam's one-cycle schedule with a 5% warm-up (at least 2 steps, which OneCycleLR needs);
    a constant ``lr`` for runs under 4 steps, too short for a cycle."""
    if total < 4:
        for group in opt.param_groups:
            group["lr"] = lr
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total,
                                               pct_start=min(0.5, max(0.05, 2.0 / total)))


def save_checkpoint(out: Path, net, opt, sched, step: int, total: int, best_key: str, best: float) -> Path:
    """``out/last.pt`` (plain tensors and numbers: loadable with ``weights_only=True``), atomically."""
    ckpt = {"model": net.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "step": step, best_key: best, "total_steps": total}
    tmp = Path(out) / ".last.pt.tmp"
    torch.save(ckpt, tmp)
    tmp.replace(Path(out) / "last.pt")
    return Path(out) / "last.pt"


def load_checkpoint(path: Path, net, opt, sched, total: int, best_key: str, device) -> tuple[int, float]:
    """Restore a :func:`save_checkpoint` file of the same schedule; returns (step, best)."""
    ckpt = torch.load(path, map_location=device, weights_only=True)
    if int(ckpt.get("total_steps", total)) != total:
        raise ValueError(f"{path}: checkpoint belongs to a {int(ckpt['total_steps'])}-step schedule, "
                         f"but {total} steps were asked for; resume with the same number of steps")
    net.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    sched.load_state_dict(ckpt["scheduler"])
    return int(ckpt["step"]), float(ckpt[best_key])


def append_row(log_csv: Path, row: list) -> None:
    with open(log_csv, "a") as fh:
        fh.write(",".join(f"{r:.6g}" if isinstance(r, float) else str(r) for r in row) + "\n")


def plot_learning_curve(log_csv: Path, png: Path, losses: dict[str, str], metric: str, metric_label: str,
                        loss_label: str = "loss", ylim=(0.0, 1.0)) -> None:
    """Left: the ``losses`` columns of ``log.csv`` (column -> label); right: ``metric``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(log_csv) as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return
    step = [int(r["step"]) for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    for col, label in losses.items():
        ax[0].plot(step, [float(r[col]) for r in rows], label=label)
    ax[0].set_xlabel("step"); ax[0].set_ylabel(loss_label); ax[0].legend()
    ax[1].plot(step, [float(r[metric]) for r in rows], "o-", label=metric_label)
    ax[1].set_xlabel("step"); ax[1].set_ylim(*ylim); ax[1].legend()
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    plt.close(fig)


__all__ = ["run_training", "one_cycle", "save_checkpoint", "load_checkpoint", "append_row", "plot_learning_curve"]
