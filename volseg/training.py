"""The training loop of every network (:func:`train_loop`) and its pieces: the one-cycle
schedule, checkpoints, the CSV log and the learning-curve picture.

A network brings only its :class:`TrainHooks` (data, network, loss, validation); the loop owns
the rest: threads and seeds, torchrun's process group (:mod:`volseg.distributed`), the
DataLoader (one share of the samples per rank), Adam with a one-cycle schedule, mixed
precision, a checkpoint every epoch (``last.pt``, resumable), ``log.csv``,
``learning_curve.png``, the best epoch by the validation metric exported as a model folder
(``best/``, :func:`volseg.nets.folder.write_model`), the end of the schedule as ``final/`` and
``summary.json``.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def one_cycle(opt, lr: float, total: int):
    """Adam's one-cycle schedule with a 5% warm-up (at least 2 steps, which OneCycleLR needs);
    a constant ``lr`` for runs under 4 steps, too short for a cycle."""
    if total < 4:
        for group in opt.param_groups:
            group["lr"] = lr
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total,
                                               pct_start=min(0.5, max(0.05, 2.0 / total)))


def save_checkpoint(out: Path, net, opt, sched, step: int, total: int, best_key: str, best: float,
                    ema=None) -> Path:
    """``out/last.pt`` (plain tensors and numbers: loadable with ``weights_only=True``), atomically;
    ``ema``: the weight average (:func:`weight_average`), stored under ``"ema"``."""
    ckpt = {"model": net.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "step": step, best_key: best, "total_steps": total}
    if ema is not None:
        ckpt["ema"] = ema.state_dict()
    tmp = Path(out) / ".last.pt.tmp"
    torch.save(ckpt, tmp)
    tmp.replace(Path(out) / "last.pt")
    return Path(out) / "last.pt"


def load_checkpoint(path: Path, net, opt, sched, total: int, best_key: str, device, ema=None) -> tuple[int, float]:
    """Restore a :func:`save_checkpoint` file of the same schedule (and its weight average into
    ``ema``); returns (step, best)."""
    ckpt = torch.load(path, map_location=device, weights_only=True)
    if int(ckpt.get("total_steps", total)) != total:
        raise ValueError(f"{path}: checkpoint belongs to a {int(ckpt['total_steps'])}-step schedule, "
                         f"but {total} steps were asked for; resume with the same number of steps")
    net.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    sched.load_state_dict(ckpt["scheduler"])
    if ema is not None:
        if "ema" not in ckpt:
            raise ValueError(f"{path}: checkpoint has no weight average (train.ema was off); resume with ema: 0")
        ema.load_state_dict(ckpt["ema"])
    return int(ckpt["step"]), float(ckpt[best_key])


def weight_average(net, decay: float):
    """An exponential moving average of ``net``'s weights and buffers (``decay`` per step;
    ``torch.optim.swa_utils``), or None when ``decay`` is 0. It starts at the current weights."""
    if not decay:
        return None
    if not 0.0 < decay < 1.0:
        raise ValueError(f"train.ema must be 0 (off) or between 0 and 1, got {decay}")
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


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


class TrainHooks:
    """What one network adds to :func:`train_loop`; subclass it and fill in the methods.

    ``prepare`` runs first (on rank 0 before the other ranks: it may fill a cache they then
    read) and sets ``self.val``, the validation items (an empty list: no validation, every
    epoch is exported as ``best/``). ``validate`` returns a dict holding ``metric``, the
    ``columns`` logged to ``log.csv`` (as ``val_<column>``) and ``per_scan`` (name -> dict).
    """

    name = "net"  # progress-bar label: "train <name>"
    metric = "dice"  # the validation key that picks the best epoch
    higher_is_better = True
    columns: tuple[str, ...] = ("dice",)  # validation keys written to log.csv after train_loss
    model_kind: str | None = None  # model.json "kind" (None: not written, a strip model)
    curve: dict = {}  # plot_learning_curve's losses / metric_label / loss_label / ylim

    def __init__(self, cfg, init: Path | None = None):
        self.cfg = cfg
        self.val: list = []
        self.init, self.init_ref = init, None  # a model folder whose weights start the training

    def load_init(self, net, kind: str):
        """``net`` with the weights of the ``init`` model folder, when there is one (its network
        settings must equal ``cfg.net``); remembers which weights in ``init_ref``."""
        if self.init is not None:
            from volseg.nets.folder import init_weights

            info = init_weights(net, Path(self.init), kind, self.cfg.net)
            self.init_ref = {"model_dir": str(self.init), "sha256": info.get("sha256")}
            log.info("weights from %s (sha256 %s...)", self.init, str(info.get("sha256"))[:12])
        return net

    def prepare(self, ctx) -> None:
        """Find (and cache) the training data and ``self.val``; ``ctx``: the DistContext."""

    def build_net(self):
        """The network to train (on the CPU; the loop moves it to the device)."""
        raise NotImplementedError

    def dataset(self, length: int, start: int):
        """``length`` samples from sample number ``start`` on (a resumed run continues the sequence)."""
        raise NotImplementedError

    def loss(self, model, batch: list, cast):
        """The loss of a batch (its tensors already on the device); ``with cast():`` is the
        mixed-precision context the forward pass runs in."""
        raise NotImplementedError

    def validate(self, net, device) -> dict:
        raise NotImplementedError

    def export_extra(self) -> dict:
        """Keys added to the exported ``model.json`` beside step, validation and config."""
        return {}

    def per_scan(self, v: dict) -> dict:
        """What the log line shows of each validation scan."""
        return {k: round(m[self.metric], 4) for k, m in v.get("per_scan", {}).items()}

    def better(self, value: float, best: float) -> bool:
        return value > best if self.higher_is_better else value < best

    @property
    def worst(self) -> float:
        """The best value before any validation (what ``last.pt`` stores until one is better)."""
        return -1.0 if self.higher_is_better else float("inf")


def _one_thread(_worker_id) -> None:
    torch.set_num_threads(1)


def train_loop(cfg, hooks: TrainHooks, resume: Path | None = None, max_steps: int | None = None,
               progress: bool = True, stop_after: int | None = None) -> dict:
    """Train ``hooks``' network with ``cfg.train`` (a :class:`~volseg.config.TrainBase`) and
    ``cfg.net``; returns the summary (steps, ``best_val_<metric>``, wall time, out_dir, the last
    validation).

    ``resume`` continues a ``last.pt`` of the same schedule (same total steps, ``max_steps`` or
    ``cfg.train.steps``); ``stop_after`` ends at that step as an interruption would (for tests).
    Under torchrun every rank calls this; each trains on its own share of the sample sequence
    (rank ``r`` of ``W`` takes samples ``r, r+W, ...``, so a step sees ``W * batch_size``
    samples) and rank 0 alone validates and writes. One process behaves as without torchrun.
    """
    import time

    from monai.utils import set_determinism

    from volseg import distributed as dist

    t_start = time.perf_counter()
    tc = cfg.train
    torch.set_num_threads(max(1, tc.threads))
    set_determinism(seed=tc.seed)
    ctx = dist.setup(tc.device)
    try:
        return _train(cfg, hooks, ctx, resume, max_steps or tc.steps, progress, stop_after, t_start)
    finally:
        dist.teardown(ctx)


def _train(cfg, hooks: TrainHooks, ctx, resume, total: int, progress, stop_after, t_start) -> dict:
    import json
    import time

    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from volseg import distributed as dist
    from volseg.config import expand_path
    from volseg.device import autocast, grad_scaler, pin_memory

    tc = cfg.train
    device, main = ctx.device, ctx.is_main
    # relative paths are taken from the current folder; ${VOLSEG_SHARED_DATA} defaults to ../shared/data
    out = Path(expand_path(tc.out_dir))
    out.mkdir(parents=True, exist_ok=True)
    with dist.main_first():  # rank 0 fills the cache, the other ranks then read it
        hooks.prepare(ctx)

    net = hooks.build_net().to(device)
    opt = torch.optim.Adam(net.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    sched = one_cycle(opt, tc.lr, total)
    scaler = grad_scaler(device, tc.amp)
    ema = weight_average(net, tc.ema)
    eval_net = ema.module if ema is not None else net  # what is validated and exported
    best_key = f"best_{hooks.metric}"
    step, best, history = 0, hooks.worst, []
    if resume:
        step, best = load_checkpoint(resume, net, opt, sched, total, best_key, device, ema)
        log.info("resumed from %s at step %d (best %s %.4f)", resume, step, hooks.metric, best)
    model = dist.wrap_model(net, ctx)  # DDP under torchrun (rank 0's weights broadcast), else net

    per_step = tc.batch_size * ctx.world_size  # samples the ranks take together per step
    ds = hooks.dataset(length=(total - step) * per_step, start=step * per_step)
    loader = DataLoader(ds, batch_size=tc.batch_size, shuffle=False, num_workers=1,
                        sampler=dist.shard_sampler(ds, ctx), pin_memory=pin_memory(device),
                        worker_init_fn=_one_thread)
    log_csv = out / "log.csv"
    if main and (not log_csv.exists() or not resume):
        cols = [f"val_{c}" for c in hooks.columns]
        log_csv.write_text(",".join(["step", "epoch", "train_loss", *cols, "lr", "seconds"]) + "\n")

    def export(dest: Path, validation) -> None:
        from volseg.config import config_to_dict
        from volseg.nets.folder import write_model

        extra = {"step": step, "validation": validation, **hooks.export_extra(), "config": config_to_dict(cfg)}
        if hooks.model_kind:
            extra["kind"] = hooks.model_kind
        write_model(eval_net, cfg.net, dest, extra)

    running, n_run = 0.0, 0
    bar = tqdm(loader, total=total - step, desc=f"train {hooks.name}", disable=not (progress and main))
    for batch in bar:
        batch = [t.to(device, non_blocking=True) for t in batch]
        loss = hooks.loss(model, batch, lambda: autocast(device, tc.amp))
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        if ema is not None:
            ema.update_parameters(net)
        step += 1
        running += float(loss.item()); n_run += 1
        bar.set_postfix(loss=f"{running / n_run:.4f}")
        if step % tc.steps_per_epoch == 0 or step == total:
            train_loss = dist.all_reduce_mean(running / n_run)  # the mean over the ranks
            running, n_run = 0.0, 0
            if main:  # validates and writes while the other ranks wait at the barrier
                v = hooks.validate(eval_net, device)
                append_row(log_csv, [step, step // tc.steps_per_epoch, train_loss, *(v[c] for c in hooks.columns),
                                     sched.get_last_lr()[0], round(time.perf_counter() - t_start, 1)])
                history.append({"step": step, "loss": train_loss, **v})
                log.info("step %d loss %.4f val %s %.4f %s", step, train_loss, hooks.metric, v[hooks.metric],
                         hooks.per_scan(v))
                if not hooks.val or hooks.better(v[hooks.metric], best):
                    best = v[hooks.metric] if hooks.val else best
                    export(out / "best", v)
                save_checkpoint(out, net, opt, sched, step, total, best_key, best, ema)
                plot_learning_curve(log_csv, out / "learning_curve.png", metric=f"val_{hooks.metric}", **hooks.curve)
            dist.barrier()
        if stop_after is not None and step >= stop_after:
            break
    best = dist.broadcast_object(best)  # only rank 0 validates
    if main and step >= total:  # the end of the schedule: what a shipped model is made from
        export(out / "final", history[-1] if history else None)
    summary = {"steps": step, f"best_val_{hooks.metric}": best, "wall_s": round(time.perf_counter() - t_start, 1),
               "out_dir": str(out), "history": history[-1:] if history else []}
    if main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


__all__ = ["TrainHooks", "train_loop", "one_cycle", "save_checkpoint", "load_checkpoint", "append_row",
           "plot_learning_curve", "weight_average"]
