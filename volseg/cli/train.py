"""``volseg train strip|ae``: train a model from a YAML config, or fine-tune the anomaly model on a
site's healthy controls."""

from __future__ import annotations

import sys
from pathlib import Path

from volseg.cli.common import EXIT_OK, UsageError, add_control_args, set_command


def _rank0() -> bool:
    """Not a torchrun worker other than rank 0 (the process group is gone when training returns)."""
    import os

    return os.environ.get("RANK", "0") == "0"


def cmd_train(args) -> int:
    if args.init is not None:  # 'shipped': volseg's own model of the kind being trained
        from volseg.nets.folder import PACKAGE_MODELS

        args.init = PACKAGE_MODELS / args.what if args.init == "shipped" else Path(args.init)
    if args.what == "ae":
        return _train_ae(args)
    if args.config is None:
        raise UsageError("'train strip' needs -c CONFIG (e.g. configs/strip.yaml)")
    if args.healthy:
        raise UsageError("--healthy is for 'volseg train ae'")
    from volseg.strip.config import load_strip_config
    from volseg.strip.train import train

    cfg = load_strip_config(args.config)
    if args.from_ratings is not None:
        cfg = _add_rated_pairs(cfg, args.from_ratings)
    summary = train(cfg, resume=args.resume, max_steps=args.steps, init=args.init)
    if _rank0():
        print(f"best validation Dice {summary['best_val_dice']:.4f} after {summary['steps']} steps; "
              f"outputs in {summary['out_dir']}")
    return EXIT_OK


def _add_rated_pairs(cfg, out: Path):
    """``cfg`` with the pairs of the scans of ``out`` whose masks the raters call good added to
    ``data.real``: a CSV written into the training run's ``out_dir``."""
    import dataclasses

    from volseg.config import expand_path
    from volseg.review.feedback import STRIP_PAIRS, rated_strip_pairs
    from volseg.strip.data import find_pairs

    dest = rated_strip_pairs(out, Path(expand_path(cfg.train.out_dir)).resolve() / STRIP_PAIRS)
    n = len(find_pairs(dest))
    if _rank0():
        print(f"added {n} rated image/mask pairs from {out} to the training data ({dest})", file=sys.stderr)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, real=tuple(cfg.data.real) + (str(dest),)))


def _train_ae(args) -> int:
    from volseg.anomaly.config import load_ae_config
    from volseg.anomaly.train import train as train_ae

    finetune = bool(args.healthy) or args.from_ratings is not None
    if not finetune:
        # a training run from a config; with --init its weights start from that model
        if args.config is None:
            raise UsageError("'train ae' needs -c CONFIG (e.g. configs/ae.yaml), or --init MODEL with the "
                             "site's healthy controls (--healthy and/or --from-ratings OUT) to fine-tune")
        cfg = load_ae_config(args.config)
        steps = args.steps
    else:
        from volseg.anomaly.adapt import finetune_config
        from volseg.cohort.controls import control_brains

        if args.init is None:
            raise UsageError("--healthy and --from-ratings controls are for fine-tuning; give --init MODEL too")
        if args.output is None:
            raise UsageError("fine-tuning (--init with --healthy or --from-ratings): give -o DIR for the "
                             "fine-tuned model")
        brains = control_brains(args.healthy, args.output / "controls", tuple(args.participant_label or ()),
                                heads=args.heads, strip_model=args.strip_model) if args.healthy else []
        if args.from_ratings is not None:
            from volseg.review.feedback import add_rated_controls

            n_given = len({Path(b).resolve() for b in brains})
            brains, n_rated = add_rated_controls(brains, args.from_ratings)
            if _rank0():
                print(f"{n_rated} rated healthy controls from {args.from_ratings}"
                      + (f" on top of {n_given} given controls" if args.healthy else ""), file=sys.stderr)
        base = load_ae_config(args.config) if args.config else None
        cfg = finetune_config(args.init, brains, args.output, steps=args.steps or 300, lr=args.lr or 1e-4,
                              synth=args.synth, base=base)
        steps = None
    summary = train_ae(cfg, resume=args.resume, max_steps=steps, init=args.init)
    if _rank0():
        if finetune:
            print(f"fine-tuned {args.init} for {summary['steps']} steps on {len(cfg.data.healthy)} controls; "
                  f"model in {summary['out_dir']}/final (calibrate it: volseg calibrate --model "
                  f"{summary['out_dir']}/final CONTROLS -o DIR)")
        else:
            print(f"best validation AUPRC {summary['best_val_auprc']:.4f} after {summary['steps']} steps; "
                  f"outputs in {summary['out_dir']}")
    return EXIT_OK


def register(sub) -> None:
    p = sub.add_parser("train", help="train a model (strip or ae)",
                       description="Train the skull-stripping network (strip) or the anomaly "
                                   "autoencoder (ae) from a YAML config.")
    p.add_argument("what", choices=["strip", "ae"], help="which model")
    p.add_argument("-c", "--config", type=Path, default=None,
                   help="YAML config, e.g. configs/strip.yaml (with --init: default the init model's own)")
    p.add_argument("--resume", type=Path, default=None, metavar="CKPT", help="checkpoint (last.pt) to resume")
    p.add_argument("--steps", type=int, default=None,
                   help="override the number of training steps (fine-tuning: default 300)")
    p.add_argument("--from-ratings", type=Path, default=None, metavar="OUT",
                   help="train on the rated scans of the run folder OUT (volseg run -o; OUT/volseg_ratings.tsv from "
                        "'volseg review'). strip: add the scans whose masks every rater calls good (source image "
                        "+ brain mask, a CSV written to the run's out_dir) to data.real; ae (with --init): "
                        "fine-tune on the scans every rater calls a good mask with no finding, with or "
                        "without --healthy")
    p.add_argument("--init", default=None, metavar="MODEL",
                   help="model folder whose weights start the training (same network), or 'shipped' for "
                        "volseg's own model of that kind (strip or ae)")
    g = p.add_argument_group("fine-tuning the anomaly model on a site's healthy controls (ae only)")
    g.add_argument("--healthy", nargs="+", default=None, metavar="INPUT",
                   help="healthy controls: brain-only images (or heads with --heads), folders, list files or a "
                        "BIDS dataset")
    add_control_args(g)
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (fine-tuning: default 1e-4)")
    g.add_argument("--synth", type=int, default=0, metavar="N",
                   help="mix in N synthetic healthy brains (default 0: the controls only)")
    g.add_argument("-o", "--output", type=Path, default=None, help="output folder of the fine-tuned model")
    set_command(p, cmd_train)
