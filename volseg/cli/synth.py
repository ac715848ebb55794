"""``volseg synth``: synthetic heads with brain (and lesion) masks."""

from __future__ import annotations

from pathlib import Path

from volseg.cli.common import EXIT_OK, UsageError, set_command


def cmd_synth(args) -> int:
    from volseg.io import check_writable_dir
    from volseg.synth import generate_cohort

    if args.n < 1:
        raise UsageError(f"-n must be at least 1, got {args.n}")
    check_writable_dir(args.output)
    written = generate_cohort(args.output, args.n, lesions=args.lesions, seed=args.seed)
    for files in written:
        print(files["image"])
    return EXIT_OK


def register(sub) -> None:
    p = sub.add_parser("synth", help="write synthetic heads with brain (and lesion) masks",
                       description="Synthetic T1 heads from the MNI152 2009 template: random "
                                   "deformation, scalp/skull/CSF layers, bias, noise, voxel size "
                                   "and orientation; deterministic by seed.")
    p.add_argument("-o", "--output", required=True, type=Path, help="output folder")
    p.add_argument("-n", type=int, default=1, help="number of subjects (default 1)")
    p.add_argument("--lesions", action="store_true", help="insert lesions and write their masks")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    set_command(p, cmd_synth)
