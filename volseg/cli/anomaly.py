"""``volseg anomaly``, ``volseg calibrate`` and ``volseg evaluate anomaly``."""

from __future__ import annotations

import sys
from pathlib import Path

from volseg.cli.common import (
    EXIT_OK,
    UsageError,
    add_control_args,
    device_name,
    finish,
    log,
    run_inputs,
    set_command,
    set_threads,
)


def _model(args, require_calibration: bool):
    from volseg.anomaly.infer import load_anomaly_model
    from volseg.device import pick_device

    device = pick_device(args.device)
    set_threads(getattr(args, "threads", 0))
    return load_anomaly_model(args.model, device, require_calibration=require_calibration)


def cmd_anomaly(args) -> int:
    from volseg.anomaly.infer import anomaly_file
    from volseg.io import check_writable_dir

    if args.mask and len(args.mask) != len(args.inputs):
        raise UsageError(f"give one --mask per input ({len(args.inputs)} inputs, {len(args.mask)} masks)")
    check_writable_dir(args.output)
    model = _model(args, require_calibration=True)
    masks = dict(zip(args.inputs, args.mask or [None] * len(args.inputs)))
    strip = None
    if not args.mask:
        from volseg.nets.folder import load_model
        from volseg.strip.config import load_strip_config

        net, _ = load_model(args.strip_model, kind="strip", device=model.device)
        strip = (net, load_strip_config(None), model.device)
    result, dup = run_inputs(args.inputs, lambda p: anomaly_file(p, args.output, model, masks[p], strip),
                             desc="anomaly")
    for path, outs in result.done:
        flag = "anomalous" if outs["flag"] else "normal"
        print(f"{path} -> {outs['map']} (score {outs['score']:.4f}, {flag})")
    return finish(result, dup)


def cmd_calibrate(args) -> int:
    from volseg.anomaly.evaluate import Case, calibrate
    from volseg.cohort.controls import control_brains
    from volseg.io import scan_id
    from volseg.nets.folder import PACKAGE_MODELS, copy_model_folder

    model = _model(args, require_calibration=False)
    maps = _map_settings(model, args.maps or [])
    dest = args.output
    if dest is None:
        if Path(model.model_dir).resolve().is_relative_to(PACKAGE_MODELS.resolve()):
            raise UsageError("give -o DIR, a folder for the calibrated model (its weights and calibration.json); "
                             "volseg does not write into its installed package")
        dest = Path(model.model_dir)
    brains = control_brains(args.healthy, Path(dest) / "controls", tuple(args.participant_label or ()),
                            heads=args.heads, strip_model=args.strip_model) if args.healthy else []
    n_rated = 0
    if args.from_ratings is not None:
        from volseg.review.feedback import add_rated_controls

        brains, n_rated = add_rated_controls(brains, args.from_ratings)
    cases = [Case(id=scan_id(p), image=str(p)) for p in brains]
    if args.synth:
        from volseg.anomaly.data import synth_brain
        from volseg.synth.cohort import cohort_seed

        for i in range(args.synth):
            s = cohort_seed(args.synth_seed, i)
            data, mask, meta = synth_brain(s)
            cases.append(Case(id=f"synth{s}", arrays=(data, mask, None, meta)))
    if not cases:
        raise UsageError("give healthy brain images, --from-ratings OUT and/or --synth N")
    if args.from_ratings is not None:
        print(f"{n_rated} rated healthy controls from {args.from_ratings} "
              + (f"on top of the given {_given(args)}" if args.healthy or args.synth else
                 "(instead of the shipped calibration set)" if args.model is None else
                 f"(instead of the calibration set of {args.model})"), file=sys.stderr)
    _warn_training_brains(model, brains)
    calib = calibrate(model, cases, fpr=args.fpr, percentile=args.percentile)
    out = copy_model_folder(model.model_dir, dest, calib, maps=maps)
    print(f"voxel threshold {calib['voxel_threshold']:.4f} (healthy FPR {calib['voxel_fpr']}), scan threshold "
          f"{calib['scan_threshold']:.4f} ({calib['scan_percentile']}th percentile of {len(cases)} healthy scans) "
          f"-> model folder {out}")
    return EXIT_OK


def _map_settings(model, pairs: list[str]) -> dict:
    """Apply ``--maps KEY=VALUE`` (YAML values) to the model's map settings in place; the new
    ``maps`` section for the calibrated folder's model.json ({} when none were given)."""
    if not pairs:
        return {}
    import dataclasses

    import yaml

    from volseg.anomaly.config import AEConfig
    from volseg.config import config_from_dict, config_to_dict

    data = config_to_dict(model.cfg)
    for kv in pairs:
        key, sep, value = kv.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--maps {kv!r}: expected KEY=VALUE, e.g. median_sizes=[5,9]")
        data["maps"][key.strip()] = yaml.safe_load(value)
    from volseg.anomaly.infer import scale_keys

    try:
        cfg = config_from_dict(data, AEConfig, source="--maps")
        scale_keys(cfg.maps)  # widths, steps and residual kinds agree (it checks all three)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"--maps: {exc}") from None
    model.cfg = dataclasses.replace(model.cfg, maps=cfg.maps)
    return config_to_dict(cfg)["maps"]


def _given(args) -> str:
    return " and ".join(w for w, on in (("controls", args.healthy), (f"{args.synth} synthetic brains", args.synth)) if on)


def _warn_training_brains(model, brains) -> None:
    """Warn when a calibration brain is one the model was trained (or fine-tuned) on: its
    thresholds would be too low for brains the model never saw."""
    from volseg.config import expand_path

    trained = ((model.info.get("config") or {}).get("data") or {}).get("healthy") or []
    seen = {Path(expand_path(str(h))).resolve() for h in trained if h != "mni152"}
    both = [str(b) for b in brains if Path(b).resolve() in seen]
    if both:
        log.warning("%d calibration brain(s) were used to train the model %s (e.g. %s); calibrate on controls it "
                    "never saw", len(both), model.model_dir, both[0])


def cmd_evaluate(args) -> int:
    from volseg.anomaly.evaluate import evaluate, lesion_cases, read_cases

    model = _model(args, require_calibration=True)
    if args.suite:
        return _suite(args, model)
    cases = []
    if args.cases:
        cases += read_cases(args.cases)
    for h in args.healthy:
        cases += lesion_cases(h, None, args.insert_lesions, seed=args.seed)
    if not cases:
        raise UsageError("give --cases CSV and/or --healthy images")
    summary = evaluate(model, cases, args.output, panels=not args.no_panels)
    v, s = summary.get("voxel", {}), summary.get("scan", {})
    if v:
        print(f"voxel (pooled over {summary['lesion_cases']} lesion cases): AUROC {v['auroc']:.4f} AUPRC "
              f"{v['auprc']:.4f} Dice@calibrated {v.get('dice', float('nan')):.4f} best Dice (optimistic) "
              f"{v['best_dice']:.4f}")
    if s:
        print("scan: " + " ".join(f"{k} {s[k]:.3f}" for k in ("accuracy", "precision", "sensitivity",
                                                               "specificity", "f1", "roc_auc")))
    print(f"tables and pictures in {args.output}", file=sys.stderr)
    return EXIT_OK


def _suite(args, model) -> int:
    import os

    from volseg.anomaly.benchmark import real_cases, run_suite, synthetic_cases
    from volseg.io import scan_id

    if not args.healthy:
        raise UsageError("--suite: give held-out healthy brains with --healthy (never used to train or "
                         "calibrate the model)")
    cases = []
    for h in args.healthy:
        cases += synthetic_cases(scan_id(h), str(h), per_family=args.per_family, seed=args.seed or 1000)
    shared = args.shared or (os.environ.get("VOLSEG_SHARED_DATA") and Path(os.environ["VOLSEG_SHARED_DATA"]))
    if shared:
        cases += real_cases(Path(shared))
    run_suite(model, cases, args.output, template=not args.no_template)
    print((Path(args.output) / "suite.md").read_text())
    print(f"tables in {args.output}: suite.md, suite_groups.tsv, suite_cases.tsv, suite.json", file=sys.stderr)
    return EXIT_OK


def register(sub) -> None:
    """Add ``anomaly``, ``calibrate`` and ``evaluate`` to the ``volseg`` subparsers ``sub``."""
    p = sub.add_parser("anomaly", help="anomaly maps, masks and scan scores on each scan's own grid",
                       description="Write <id>_desc-anomaly_map.nii.gz (float32, 0 outside the brain), "
                                   "<id>_label-anomaly_mask.nii.gz (uint8) and <id>_desc-reconstruction_T1w"
                                   ".nii.gz with JSON sidecars (scan score and normal/anomalous flag). With "
                                   "--mask the input is a brain-only image with that mask; without it the "
                                   "head is skull-stripped first.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="NIfTI or MGH T1 images")
    p.add_argument("-o", "--output", required=True, type=Path, help="output folder")
    p.add_argument("--mask", action="append", default=None, metavar="MASK",
                   help="brain mask of the input (repeat once per input, in order)")
    p.add_argument("--model", type=Path, default=None, help="anomaly model folder (default: shipped)")
    p.add_argument("--strip-model", type=Path, default=None, help="skull-strip model folder (default: shipped)")
    p.add_argument("--device", default="auto", type=device_name, help="auto, cpu or cuda (default auto)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default: torch's)")
    set_command(p, cmd_anomaly)

    p = sub.add_parser("calibrate", help="set the anomaly thresholds on healthy brains",
                       description="Voxel threshold at a healthy false-positive rate, scan threshold at "
                                   "the 95th percentile of healthy scan scores, from healthy controls only; "
                                   "writes a complete model folder (weights + calibration.json) that "
                                   "'volseg anomaly --model' and 'volseg run --anomaly-model' use. The controls "
                                   "are the given images, the scans of a run rated healthy (--from-ratings) "
                                   "and/or synthetic brains (--synth); they replace the model's calibration set.")
    p.add_argument("healthy", nargs="*", metavar="INPUT",
                   help="healthy controls never used to train the model: brain-only images (mask: non-zero voxels "
                        "or a X_brainmask file beside), or heads with --heads; files, folders, list files or BIDS")
    add_control_args(p)
    p.add_argument("--from-ratings", type=Path, default=None, metavar="OUT",
                   help="add the brain images of the scans of the run folder OUT (volseg run -o) that every rater "
                        "calls a good mask with no finding (OUT/volseg_ratings.tsv, from 'volseg review')")
    p.add_argument("--synth", type=int, default=0, metavar="N",
                   help="add N synthetic healthy brains (the shipped model was calibrated on a real brain that is "
                        "not shipped plus --synth 8 --synth-seed 9000: add --synth 8 to keep that part)")
    p.add_argument("--synth-seed", type=int, default=9000, help="seed of the synthetic brains (default 9000)")
    p.add_argument("--fpr", type=float, default=None, help="healthy voxel false-positive rate (config: 0.001)")
    p.add_argument("--percentile", type=float, default=None, help="scan-score percentile (config: 95)")
    p.add_argument("--model", type=Path, default=None, help="anomaly model folder (default: shipped)")
    p.add_argument("-o", "--output", type=Path, default=None,
                   help="folder of the calibrated model: weights, model.json and calibration.json (default: the "
                        "--model folder itself; required for the shipped model)")
    p.add_argument("--maps", action="append", default=[], metavar="KEY=VALUE",
                   help="change a map setting of the calibrated model, e.g. --maps residual=signed --maps "
                        "median_sizes=[5,9] (written into the output folder's model.json)")
    p.add_argument("--device", default="auto", type=device_name, help="auto, cpu or cuda")
    set_command(p, cmd_calibrate)

    p = sub.add_parser("evaluate", help="measure the anomaly stage on labelled cases",
                       description="Voxel AUROC/AUPRC pooled over brain voxels, Dice at the calibrated "
                                   "threshold, best-threshold Dice (optimistic), scan-level accuracy, "
                                   "precision, sensitivity, specificity, F1 and ROC AUC; a TSV, a JSON and "
                                   "picture panels.")
    p.add_argument("what", choices=["anomaly"], help="what to evaluate")
    p.add_argument("--cases", type=Path, default=None, help="CSV with columns id,image,mask,lesion")
    p.add_argument("--healthy", nargs="*", default=[], metavar="BRAIN",
                   help="healthy brains: kept as healthy cases, and lesions inserted (--insert-lesions)")
    p.add_argument("--insert-lesions", type=int, default=3, metavar="N",
                   help="lesion cases made per healthy brain (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the inserted lesions")
    p.add_argument("--model", type=Path, default=None, help="anomaly model folder (default: shipped)")
    p.add_argument("--no-panels", action="store_true", help="skip the picture panels")
    p.add_argument("--suite", action="store_true",
                   help="the benchmark: every lesion family (dark, grey, subtle, bright; 3-25 mm; ellipsoid and "
                        "multi-lobed; deep, periventricular, juxtacortical) in each --healthy brain, real lesions "
                        "from --shared, beside raw-intensity, |x - WM| and MNI152-template baselines")
    p.add_argument("--per-family", type=int, default=2, metavar="N", help="--suite: cases per family and brain")
    p.add_argument("--shared", type=Path, default=None, metavar="DIR",
                   help="--suite: folder with lesion/brats2013 and lesion/open_ms_mni (default $VOLSEG_SHARED_DATA)")
    p.add_argument("--no-template", action="store_true", help="--suite: skip the template baseline")
    p.add_argument("-o", "--output", required=True, type=Path, help="output folder")
    p.add_argument("--device", default="auto", type=device_name, help="auto, cpu or cuda")
    set_command(p, cmd_evaluate)
