"""``volseg preprocess``: N4 bias correction and the 2 mm working grid."""

from __future__ import annotations

from pathlib import Path

from volseg.cli.common import finish, run_inputs, set_command


def cmd_preprocess(args) -> int:
    from volseg.config import load_config
    from volseg.io import check_writable_dir
    from volseg.preprocess import preprocess_file

    cfg = load_config(args.config)
    check_writable_dir(args.output)
    result, dup = run_inputs(args.inputs, lambda p: preprocess_file(p, args.output, cfg), desc="preprocess")
    for path, outs in result.done:
        print(f"{path} -> {outs['native']}")
    return finish(result, dup)


def register(sub) -> None:
    p = sub.add_parser("preprocess", help="N4 bias correction and the 2 mm working grid",
                       description="Write, per input, the N4-corrected image on its native grid "
                                   "(<id>_desc-preproc_T1w.nii.gz), the 96x128x160 2 mm working-"
                                   "grid image (<id>_space-volseg_res-2_desc-preproc_T1w.nii.gz) "
                                   "and JSON sidecars.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="NIfTI (.nii, .nii.gz) or MGH (.mgz) files")
    p.add_argument("-o", "--output", required=True, type=Path, help="output folder")
    p.add_argument("-c", "--config", type=Path, default=None,
                   help="YAML settings (default: configs/default.yaml)")
    set_command(p, cmd_preprocess)
