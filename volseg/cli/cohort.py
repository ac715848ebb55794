"""``volseg run`` (a cohort end to end) and ``volseg gather`` (merge the shards of a run)."""

from __future__ import annotations

import sys
from pathlib import Path

from volseg.cli.common import EXIT_FAILED, EXIT_OK, UsageError, device_name, set_command


def cmd_run(args) -> int:
    from volseg.cohort.run import RunOptions, run_cohort
    from volseg.cohort.shard import ShardError, parse_shard
    from volseg.cohort.stages import StageError, parse_stages

    try:
        stages = parse_stages(args.stages)
        shard = parse_shard(args.shard)
    except (StageError, ShardError) as exc:
        raise UsageError(str(exc)) from None
    if args.jobs < 1 or args.threads < 0 or (args.batch_size is not None and args.batch_size < 1):
        raise UsageError("--jobs and --batch-size must be >= 1 and --threads >= 0")
    inputs = list(args.inputs)
    if not inputs:
        from volseg.cohort.example import example_cohort

        root = args.output / "sourcedata" / "example"
        print(f"volseg run: no INPUT given; using the example cohort in {root}", file=sys.stderr)
        inputs = [example_cohort(root)]
    if args.list:
        return _list(inputs, args, shard)
    opts = RunOptions(stages=stages, config=str(args.config) if args.config else None,
                      device=args.device, threads=args.threads, tta=args.tta, border_mm=args.border,
                      strip_model=str(args.strip_model or args.model) if (args.strip_model or args.model) else None,
                      anomaly_model=str(args.anomaly_model) if args.anomaly_model else None,
                      figures=not args.no_report,
                      batch_size=args.batch_size,
                      overlap={"auto": None, "on": True, "off": False}[args.overlap])
    try:
        res = run_cohort(inputs, args.output, opts=opts, participants=args.participant_label or (),
                         jobs=args.jobs, shard=shard, overwrite=args.overwrite,
                         report=not args.no_report, argv=sys.argv)
    except StageError as exc:
        raise UsageError(str(exc)) from None
    print(f"volseg run: {len(res.done)} done, {len(res.skipped)} already complete (skipped), "
          f"{len(res.failed)} failed; log {res.log_file}", file=sys.stderr)
    for rec in res.failed:
        print(f"  FAILED [{rec.get('stage')}] {rec.get('error')}", file=sys.stderr)
    for p in res.tables:
        print(p)
    return EXIT_FAILED if res.failed else EXIT_OK


def _list(inputs, args, shard) -> int:
    """Print the scans this run (shard) would process and where their outputs go."""
    from volseg.cohort.inputs import discover, split_duplicates
    from volseg.cohort.shard import select_shard

    scans, dups = split_duplicates(discover(inputs, tuple(args.participant_label or ())))
    for s in select_shard(scans, shard):
        print(f"{s.path}\t{args.output / s.rel_dir / s.prefix}")
    for s, err in select_shard(dups, shard):
        print(f"{s.path}\tREFUSED: {err}")
    return EXIT_OK


def cmd_gather(args) -> int:
    from volseg.cohort.tables import gather
    from volseg.errors import InputError

    if not args.output.is_dir():
        raise InputError(args.output, "folder not found (give the folder of a 'volseg run -o')")
    res = gather(args.output, report=not args.no_report)
    print(f"volseg gather: {res.n_ok} scans done, {res.n_failed} failed"
          + (f"; unfinished shards: {', '.join(res.missing_shards)}" if res.missing_shards else ""),
          file=sys.stderr)
    for row in res.rejected:
        print(f"volseg gather: {row['scan']} rejected by {', '.join(row['raters'])}"
              + (f" ({'; '.join(row['comments'])})" if row["comments"] else ""), file=sys.stderr)
    for p in res.paths:
        print(p)
    return EXIT_OK if res.ok else EXIT_FAILED


def register(sub) -> None:
    p = sub.add_parser(
        "run", help="a cohort end to end: N4, skull stripping, anomaly maps, tables, QC report",
        description="Run a cohort (a BIDS dataset, folders of scans, text/CSV lists or files) into a "
                    "BIDS-derivatives folder: per scan sub-X/[ses-Y/]anat/*_desc-preproc_T1w, "
                    "_desc-brain_mask, _desc-brain_T1w, _desc-anomaly_map, _label-anomaly_mask "
                    "(+ JSON sidecars), then volseg_summary.tsv, volseg_failures.tsv and report.html. "
                    "Complete scans are skipped on a rerun; failed scans are listed and the exit "
                    "code is 1. Without INPUT, runs the example cohort (synthetic heads).")
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="BIDS dataset folder, folder of scans, .txt/.csv/.tsv list, or image files")
    p.add_argument("-o", "--output", required=True, type=Path, help="output (derivatives) folder")
    p.add_argument("--stages", default=None,
                   help="comma-separated subset of n4,strip,anomaly (export always runs); default: "
                        "all available (anomaly is left out with a warning when its model is missing)")
    p.add_argument("-c", "--config", type=Path, default=None,
                   help="YAML settings in the configs/strip.yaml format (preprocess: section for N4)")
    p.add_argument("--participant-label", nargs="+", default=None, metavar="LABEL",
                   help="only these subjects (with or without 'sub-')")
    p.add_argument("--device", default="auto", type=device_name, help="auto, cpu or cuda (default auto)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch and N4 (default: the libraries' own)")
    p.add_argument("--jobs", type=int, default=1,
                   help="worker processes, each taking whole scans (default 1)")
    p.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help="scans that go through each network together (default: 4 on a GPU, 1 on "
                        "the CPU, where batching gains nothing; each worker holds N scans in memory)")
    p.add_argument("--overlap", choices=("auto", "on", "off"), default="auto",
                   help="write each batch's outputs (gzip, pictures) in a thread while the next batch "
                        "is computed (default auto: on with a GPU, off on the CPU, where the networks "
                        "already use every core)")
    p.add_argument("--shard", default=None, metavar="K/N",
                   help="process shard K of N (0 <= K < N); default from SLURM_ARRAY_TASK_ID/COUNT")
    p.add_argument("--overwrite", action="store_true", help="redo scans that are already complete")
    p.add_argument("--tta", action="store_true", help="strip: average with a left-right flip")
    p.add_argument("--border", type=float, default=None, metavar="MM",
                   help="strip: grow (>0) or shrink (<0) the mask by MM millimetres")
    p.add_argument("--strip-model", type=Path, default=None, help="strip model folder (default: shipped)")
    p.add_argument("--model", type=Path, default=None, help="same as --strip-model (kept for older scripts)")
    p.add_argument("--anomaly-model", type=Path, default=None,
                   help="anomaly model folder with its calibration, e.g. made by 'volseg calibrate -o' "
                        "(default: shipped)")
    p.add_argument("--no-report", action="store_true", help="no QC pictures and no report.html")
    p.add_argument("--list", action="store_true",
                   help="only print the scans (of this shard) and their output prefixes")
    set_command(p, cmd_run)

    p = sub.add_parser("gather", help="merge the shards of a run into the tables and the report",
                       description="Rebuild OUT/volseg_summary.tsv, OUT/volseg_failures.tsv and "
                                   "OUT/report.html from every scan recorded in OUT (all shards), and "
                                   "list the scans whose brain mask a rater rejects in OUT/volseg_ratings.tsv "
                                   "('volseg review'; only read) on stderr and in OUT/volseg_rejected.tsv "
                                   "(removed when none is). Exit code 1 when a scan failed or a shard has not "
                                   "finished.")
    p.add_argument("output", type=Path, metavar="OUT", help="the folder given to volseg run -o")
    p.add_argument("--no-report", action="store_true", help="tables only")
    set_command(p, cmd_gather)
