"""``volseg strip``: skull stripping, brain masks on each scan's own grid."""

from __future__ import annotations

from pathlib import Path

from volseg.cli.common import device_name, finish, run_inputs, set_command, set_threads


def cmd_strip(args) -> int:
    from volseg.device import pick_device
    from volseg.io import check_writable_dir
    from volseg.nets.folder import load_model
    from volseg.strip.config import load_strip_config
    from volseg.strip.infer import strip_file

    cfg = load_strip_config(args.config)
    check_writable_dir(args.output)
    device = pick_device(args.device)
    set_threads(args.threads)
    net, _ = load_model(args.model, kind="strip", device=device)
    qc = None if args.no_qc else strip_qc
    result, dup = run_inputs(args.inputs, lambda p: strip_file(p, args.output, net, cfg, device, tta=args.tta,
                                                               border_mm=args.border, qc=qc), desc="strip")
    for path, outs in result.done:
        checks = outs.get("qc")
        verdict = "" if checks is None else f"  [qc: {checks['qc']}" + (
            f": {'; '.join(checks['notes'])}]" if checks["notes"] else "]")
        print(f"{path} -> {outs['mask']}{verdict}")
    return finish(result, dup)


def strip_qc(native, mask, meta, prediction) -> dict:
    """The self-QC of ``volseg run`` (:mod:`volseg.cohort.selfqc`) for one stripped scan, as the
    sidecars' ``QC``: ``qc`` (ok/check), ``notes`` (header warnings, then one sentence per reason),
    ``reasons`` (codes) and ``measures`` (the numbers behind them)."""
    import numpy as np

    from volseg.cohort.selfqc import self_qc

    affine = getattr(meta, "affine", None)
    if affine is None:
        affine = np.diag(list(meta.zooms) + [1.0])
    sq = self_qc(native, mask, affine, meta.zooms, prediction=prediction)
    notes = list(getattr(meta, "header_warnings", [])) + list(sq.notes)
    measures = {k: v for k, v in sq.measures.items() if k != "qc_reasons"}
    return {"qc": "check" if notes else "ok", "notes": notes, "reasons": list(sq.reasons), "measures": measures}


def register(sub) -> None:
    p = sub.add_parser("strip", help="skull stripping: brain masks on each scan's own grid",
                       description="Write <id>_desc-brain_mask.nii.gz (uint8, the input's grid) and "
                                   "<id>_desc-brain_T1w.nii.gz with JSON sidecars. Each scan's self-QC "
                                   "(as in volseg run) goes into the sidecars as QC and is printed.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="NIfTI or MGH head scans")
    p.add_argument("-o", "--output", required=True, type=Path, help="output folder")
    p.add_argument("-c", "--config", type=Path, default=None, help="YAML settings (configs/strip.yaml)")
    p.add_argument("--device", default="auto", type=device_name, help="auto, cpu or cuda (default auto)")
    p.add_argument("--border", type=float, default=None, metavar="MM",
                   help="grow (>0) or shrink (<0) the mask by MM millimetres")
    p.add_argument("--tta", action="store_true", help="average with a left-right flipped prediction")
    p.add_argument("--no-qc", action="store_true",
                   help="skip the self-QC (the mask's own checks, as in volseg run; it costs one more "
                        "network pass without --tta and about 0.5 s a scan)")
    p.add_argument("--model", type=Path, default=None, help="model folder (default: the shipped model)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default: torch's)")
    set_command(p, cmd_strip)
