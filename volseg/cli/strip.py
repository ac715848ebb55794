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
    result, dup = run_inputs(args.inputs, lambda p: strip_file(p, args.output, net, cfg, device, tta=args.tta,
                                                               border_mm=args.border), desc="strip")
    for path, outs in result.done:
        print(f"{path} -> {outs['mask']}")
    return finish(result, dup)


def register(sub) -> None:
    p = sub.add_parser("strip", help="skull stripping: brain masks on each scan's own grid",
                       description="Write <id>_desc-brain_mask.nii.gz (uint8, the input's grid) and "
                                   "<id>_desc-brain_T1w.nii.gz with JSON sidecars.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="NIfTI or MGH head scans")
    p.add_argument("-o", "--output", required=True, type=Path, help="output folder")
    p.add_argument("-c", "--config", type=Path, default=None, help="YAML settings (configs/strip.yaml)")
    p.add_argument("--device", default="auto", type=device_name, help="auto, cpu or cuda (default auto)")
    p.add_argument("--border", type=float, default=None, metavar="MM",
                   help="grow (>0) or shrink (<0) the mask by MM millimetres")
    p.add_argument("--tta", action="store_true", help="average with a left-right flipped prediction")
    p.add_argument("--model", type=Path, default=None, help="model folder (default: the shipped model)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default: torch's)")
    set_command(p, cmd_strip)
