"""The ``volseg`` command. Thin: parses arguments and calls library functions.

Heavy imports (torch, MONAI, nibabel) happen inside the commands so that ``volseg --help``
answers at once.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from volseg import __version__

log = logging.getLogger("volseg")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="volseg %(levelname)s: %(message)s", stream=sys.stderr)


def _unique_ids(inputs: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Inputs whose scan ids are unique, and (input, error) for the later duplicates."""
    from volseg.io import scan_id

    seen: dict[str, str] = {}
    keep, dup = [], []
    for p in inputs:
        sid = scan_id(p)
        if sid in seen:
            dup.append((p, f"{p}: scan id '{sid}' is already used by {seen[sid]}; rename one"))
        else:
            seen[sid] = p
            keep.append(p)
    return keep, dup


def _finish(result, extra_failures=(), what: str = "scans") -> int:
    failures = list(extra_failures) + list(result.failed)
    for _, msg in extra_failures:
        log.error("%s", msg)
    n_ok = len(result.done)
    print(f"volseg: {n_ok} {what} done, {len(failures)} failed", file=sys.stderr)
    for _, msg in failures:
        print(f"  FAILED {msg}", file=sys.stderr)
    return EXIT_FAILED if failures else EXIT_OK


def cmd_preprocess(args) -> int:
    from volseg.config import load_config
    from volseg.io import check_writable_dir
    from volseg.preprocess import preprocess_file
    from volseg.runner import run_batch

    cfg = load_config(args.config)
    check_writable_dir(args.output)
    inputs, dup = _unique_ids(args.inputs)
    result = run_batch(inputs, lambda p: preprocess_file(p, args.output, cfg), desc="preprocess")
    for path, outs in result.done:
        print(f"{path} -> {outs['native']}")
    return _finish(result, dup)


def cmd_synth(args) -> int:
    from volseg.io import check_writable_dir
    from volseg.synth import generate_cohort

    check_writable_dir(args.output)
    if args.n < 1:
        raise SystemExit("volseg synth: -n must be at least 1")
    written = generate_cohort(args.output, args.n, lesions=args.lesions, seed=args.seed)
    for files in written:
        print(files["image"])
    return EXIT_OK


def _rank0() -> bool:
    """Not a torchrun worker other than rank 0 (the process group is gone when training returns)."""
    import os

    return os.environ.get("RANK", "0") == "0"


def cmd_train(args) -> int:
    if args.what == "ae":
        return _train_ae(args)
    if args.config is None:
        raise SystemExit("volseg train strip: give -c CONFIG (e.g. configs/strip.yaml)")
    if args.init or args.healthy:
        raise SystemExit("volseg train strip: --init and --healthy are for 'volseg train ae'")
    from volseg.strip.config import load_strip_config
    from volseg.strip.train import train

    cfg = load_strip_config(args.config)
    summary = train(cfg, resume=args.resume, max_steps=args.steps)
    if _rank0():
        print(f"best validation Dice {summary['best_val_dice']:.4f} after {summary['steps']} steps; "
              f"outputs in {summary['out_dir']}")
    return EXIT_OK


def _train_ae(args) -> int:
    from volseg.anomaly.config import load_ae_config
    from volseg.anomaly.train import train as train_ae

    if args.init is not None:
        from volseg.nets.folder import PACKAGE_MODELS

        args.init = PACKAGE_MODELS / "ae" if args.init == "shipped" else Path(args.init)
    if not args.healthy:
        # a training run from a config; with --init its weights start from that model
        if args.config is None:
            raise SystemExit("volseg train ae: give -c CONFIG (e.g. configs/ae.yaml), or --init MODEL with the "
                             "site's healthy controls (--healthy) to fine-tune")
        cfg = load_ae_config(args.config)
        steps = args.steps
    else:
        from volseg.anomaly.adapt import control_brains, finetune_config

        if args.init is None:
            raise SystemExit("volseg train ae: --healthy controls are for fine-tuning; give --init MODEL too")
        if args.output is None:
            raise SystemExit("volseg train ae --init: give -o DIR for the fine-tuned model")
        brains = control_brains(args.healthy, args.output / "controls", tuple(args.participant_label or ()),
                                heads=args.heads, strip_model=args.strip_model)
        base = load_ae_config(args.config) if args.config else None
        cfg = finetune_config(args.init, brains, args.output, steps=args.steps or 300, lr=args.lr or 1e-4,
                              synth=args.synth, base=base)
        steps = None
    summary = train_ae(cfg, resume=args.resume, max_steps=steps, init=args.init)
    if _rank0():
        if args.healthy:
            print(f"fine-tuned {args.init} for {summary['steps']} steps on {len(cfg.data.healthy)} controls; "
                  f"model in {summary['out_dir']}/final (calibrate it: volseg calibrate --model "
                  f"{summary['out_dir']}/final CONTROLS -o DIR)")
        else:
            print(f"best validation AUPRC {summary['best_val_auprc']:.4f} after {summary['steps']} steps; "
                  f"outputs in {summary['out_dir']}")
    return EXIT_OK


def cmd_strip(args) -> int:
    from volseg.device import pick_device
    from volseg.io import check_writable_dir
    from volseg.runner import run_batch
    from volseg.strip.config import load_strip_config
    from volseg.strip.infer import strip_file
    from volseg.nets.folder import load_model

    cfg = load_strip_config(args.config)
    check_writable_dir(args.output)
    device = pick_device(args.device)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    net, _ = load_model(args.model, kind="strip", device=device)
    inputs, dup = _unique_ids(args.inputs)
    result = run_batch(inputs, lambda p: strip_file(p, args.output, net, cfg, device, tta=args.tta,
                                                    border_mm=args.border), desc="strip")
    for path, outs in result.done:
        print(f"{path} -> {outs['mask']}")
    return _finish(result, dup)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="volseg",
        description="Bias correction, skull stripping and anomaly maps for 3D brain MRI, "
                    "with every output on the scan's own grid.",
    )
    parser.add_argument("--version", action="version", version=f"volseg {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("preprocess", help="N4 bias correction and the 2 mm working grid",
                       description="Write, per input, the N4-corrected image on its native grid "
                                   "(<id>_desc-preproc_T1w.nii.gz), the 96x128x160 2 mm working-"
                                   "grid image (<id>_space-volseg_res-2_desc-preproc_T1w.nii.gz) "
                                   "and JSON sidecars.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="NIfTI (.nii, .nii.gz) or MGH (.mgz) files")
    p.add_argument("-o", "--output", required=True, type=Path, help="output folder")
    p.add_argument("-c", "--config", type=Path, default=None,
                   help="YAML settings (default: configs/default.yaml)")
    p.set_defaults(func=cmd_preprocess)

    p = sub.add_parser("synth", help="write synthetic heads with brain (and lesion) masks",
                       description="Synthetic T1 heads from the MNI152 2009 template: random "
                                   "deformation, scalp/skull/CSF layers, bias, noise, voxel size "
                                   "and orientation; deterministic by seed.")
    p.add_argument("-o", "--output", required=True, type=Path, help="output folder")
    p.add_argument("-n", type=int, default=1, help="number of subjects (default 1)")
    p.add_argument("--lesions", action="store_true", help="insert lesions and write their masks")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("strip", help="skull stripping: brain masks on each scan's own grid",
                       description="Write <id>_desc-brain_mask.nii.gz (uint8, the input's grid) and "
                                   "<id>_desc-brain_T1w.nii.gz with JSON sidecars.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="NIfTI or MGH head scans")
    p.add_argument("-o", "--output", required=True, type=Path, help="output folder")
    p.add_argument("-c", "--config", type=Path, default=None, help="YAML settings (configs/strip.yaml)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    p.add_argument("--border", type=float, default=None, metavar="MM",
                   help="grow (>0) or shrink (<0) the mask by MM millimetres")
    p.add_argument("--tta", action="store_true", help="average with a left-right flipped prediction")
    p.add_argument("--model", type=Path, default=None, help="model folder (default: the shipped model)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default: torch's)")
    p.set_defaults(func=cmd_strip)

    p = sub.add_parser("train", help="train a model (strip or ae)",
                       description="Train the skull-stripping network (strip) or the anomaly "
                                   "autoencoder (ae) from a YAML config.")
    p.add_argument("what", choices=["strip", "ae"], help="which model")
    p.add_argument("-c", "--config", type=Path, default=None,
                   help="YAML config, e.g. configs/strip.yaml (with --init: default the init model's own)")
    p.add_argument("--resume", type=Path, default=None, metavar="CKPT", help="checkpoint (last.pt) to resume")
    p.add_argument("--steps", type=int, default=None,
                   help="override the number of training steps (fine-tuning: default 300)")
    g = p.add_argument_group("fine-tuning the anomaly model on a site's healthy controls (ae only)")
    g.add_argument("--init", default=None, metavar="MODEL",
                   help="model folder to start from, or 'shipped' for volseg's own anomaly model")
    g.add_argument("--healthy", nargs="+", default=None, metavar="INPUT",
                   help="healthy controls: brain-only images (or heads with --heads), folders, list files or a "
                        "BIDS dataset")
    from volseg.cli_anomaly import add_control_args

    add_control_args(g)
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (fine-tuning: default 1e-4)")
    g.add_argument("--synth", type=int, default=0, metavar="N",
                   help="mix in N synthetic healthy brains (default 0: the controls only)")
    g.add_argument("-o", "--output", type=Path, default=None, help="output folder of the fine-tuned model")
    p.set_defaults(func=cmd_train)

    from volseg import cli_anomaly, cli_cohort, cli_hpc

    for module in (cli_anomaly, cli_cohort, cli_hpc):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_USAGE
    _setup_logging(args.verbose)
    from volseg.errors import VolsegError

    try:
        return int(args.func(args) or 0)
    except VolsegError as exc:
        print(f"volseg {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("volseg: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
