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
    written = generate_cohort(args.output, args.n, lesions=args.lesions, seed=args.seed, contrast=args.contrast)
    for files in written:
        print(files["image"])
    return EXIT_OK


def register(sub) -> None:
    p = sub.add_parser("synth", help="write synthetic heads with brain (and lesion) masks",
                       description="Synthetic heads from the MNI152 2009 template and its tissue "
                                   "maps: random deformation, scalp/skull/CSF layers, bias, noise, "
                                   "voxel size and orientation; deterministic by seed. T1-weighted "
                                   "by default; --contrast paints the same subjects as T2, PD or FLAIR.")
    p.add_argument("-o", "--output", required=True, type=Path, help="output folder")
    p.add_argument("-n", type=int, default=1, help="number of subjects (default 1)")
    p.add_argument("--lesions", action="store_true", help="insert lesions and write their masks")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--contrast", choices=["t1", "t2", "pd", "flair"], default="t1",
                   help="tissue contrast (default t1); the anatomy of a seed is the same in every contrast")
    set_command(p, cmd_synth)
