"""``volseg slurm submit``: a cohort as a SLURM job array plus a gather job."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from volseg.cli.common import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, set_command


def cmd_slurm_submit(args) -> int:
    from volseg.cohort.slurm import Resources, build_plan, count_scans, render, submit

    res = Resources(partition=args.partition, time=args.time, mem=args.mem or None,
                    cpus_per_task=args.cpus_per_task, gpus=args.gpus,
                    array_parallelism=args.array_parallelism, scans_per_task=args.scans_per_task,
                    extra_sbatch=tuple(args.sbatch_arg))
    run_args = []
    if args.stages:
        run_args += ["--stages", args.stages]
    if args.config:
        run_args += ["--config", str(Path(args.config).absolute())]
    if args.participant_label:
        run_args += ["--participant-label", *args.participant_label]
    for flag, value in (("--strip-model", args.strip_model), ("--anomaly-model", args.anomaly_model)):
        if value:
            run_args += [flag, str(Path(value).absolute())]
    for extra in args.run_arg:
        run_args += shlex.split(extra)
    n = count_scans(args.inputs, tuple(args.participant_label or ()))
    plan = build_plan(args.inputs, args.output, n, res, volseg_cmd=args.volseg_cmd, run_args=run_args)
    if args.dry_run:
        print(render(plan))
        print(f"# dry run: {plan.n_scans} scans, array of {plan.n_tasks} tasks + 1 gather job; "
              "nothing written or submitted", file=sys.stderr)
        return EXIT_OK
    sub = submit(plan)
    print(f"array {sub.array_id} ({plan.n_tasks} tasks, {plan.n_scans} scans)")
    print(f"gather {sub.gather_id} (after the array, afterany)")
    print(f"scripts and logs: {plan.folder}")
    sys.stdout.flush()
    if not args.wait:
        return EXIT_OK
    return _wait(sub, args.poll)


def _wait(sub, poll: float) -> int:
    from volseg.cohort.slurm import read_failures, wait

    def show(states):
        counts: dict[str, int] = {}
        for s in states.values():
            counts[s] = counts.get(s, 0) + 1
        print("volseg slurm: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())), file=sys.stderr)

    try:
        states = wait([sub.array_id, sub.gather_id], poll_s=poll, on_change=show)
    except KeyboardInterrupt:
        print(f"volseg slurm: stopped waiting; the jobs go on (squeue -j {sub.array_id},{sub.gather_id})",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    bad_jobs = {j: s for j, s in states.items() if s != "COMPLETED"}
    failures = read_failures(sub.plan.out)
    summary = sub.plan.out / "volseg_summary.tsv"
    for row in failures:
        print(f"  FAILED {' '.join(v for v in row.values() if v)}", file=sys.stderr)
    for jid, state in sorted(bad_jobs.items()):
        print(f"  job {jid}: {state} (logs in {sub.plan.folder / 'logs'})", file=sys.stderr)
    if not summary.exists():
        print(f"volseg slurm: no {summary}: the gather job did not write it", file=sys.stderr)
    print(f"volseg slurm: {len(failures)} scans failed, {len(bad_jobs)} jobs did not complete; "
          f"summary {summary}", file=sys.stderr)
    return EXIT_FAILED if failures or bad_jobs or not summary.exists() else EXIT_OK


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def register(sub) -> None:
    p = sub.add_parser("slurm", help="run a cohort as a SLURM job array",
                       description="Run `volseg run` over a cohort as a SLURM job array.")
    ssub = p.add_subparsers(dest="slurm_command", metavar="SUBCOMMAND", required=True)
    s = ssub.add_parser(
        "submit", help="submit a job array + gather job",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write OUT/slurm/array.sbatch (a job array whose task K of N runs "
                    "`volseg run INPUT... -o OUT --shard K/N`), OUT/slurm/gather.sbatch (`volseg "
                    "gather OUT`, submitted with --dependency=afterany on the array so it runs "
                    "even when tasks fail) and OUT/slurm/submit.sh, then submit them with sbatch "
                    "and print the job ids. Resubmitting resumes: finished scans are skipped. "
                    "Threads follow SLURM_CPUS_PER_TASK.",
        epilog="example:\n  volseg slurm submit rawdata/ -o derivatives/volseg --partition cpu "
               "--time 02:00:00 --mem 8G \\\n      --cpus-per-task 2 --scans-per-task 20 "
               "--array-parallelism 50 --wait")
    s.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="as for `volseg run`: BIDS dataset, folder, list file or scans")
    s.add_argument("-o", "--output", required=True, type=Path, help="output folder (OUT)")
    s.add_argument("--partition", default=None, help="SLURM partition (default: the cluster's)")
    s.add_argument("--time", default=None, help="time limit per task, e.g. 01:00:00 (default: the partition's)")
    s.add_argument("--mem", default="8G", help="memory per task (default 8G; '' for the cluster's default)")
    s.add_argument("--cpus-per-task", type=_positive, default=2, help="CPUs per task (default 2)")
    s.add_argument("--gpus", type=int, default=0, help="GPUs per task (default 0); >0 runs with --device cuda")
    s.add_argument("--array-parallelism", type=_positive, default=None, metavar="K",
                   help="at most K tasks running at once (the %%K of --array)")
    s.add_argument("--scans-per-task", type=_positive, default=10, metavar="M",
                   help="scans per array task (default 10): the array has ceil(n/M) tasks")
    s.add_argument("--stages", default=None, help="passed to `volseg run --stages`")
    s.add_argument("-c", "--config", type=Path, default=None, help="passed to `volseg run --config`")
    s.add_argument("--strip-model", type=Path, default=None, help="passed to `volseg run --strip-model`")
    s.add_argument("--anomaly-model", type=Path, default=None,
                   help="passed to `volseg run --anomaly-model` (e.g. a site-calibrated model folder)")
    s.add_argument("--participant-label", nargs="+", default=None, metavar="LABEL",
                   help="passed to `volseg run --participant-label` (and used to count the scans)")
    s.add_argument("--run-arg", action="append", default=[], metavar="ARGS",
                   help="further `volseg run` options, e.g. --run-arg='--participant-label 01' (repeatable)")
    s.add_argument("--sbatch-arg", action="append", default=[], metavar="OPT",
                   help="a further #SBATCH option, e.g. --sbatch-arg=--account=lab (repeatable)")
    s.add_argument("--volseg-cmd", default=None, metavar="CMD",
                   help="how jobs start volseg (default: this Python with -m volseg), "
                        "e.g. 'apptainer run --nv /path/volseg.sif'")
    s.add_argument("--wait", action="store_true",
                   help="wait for the jobs (polling squeue); exit 1 if any scan or job failed")
    s.add_argument("--poll", type=float, default=2.0, metavar="SECONDS",
                   help="squeue polling interval with --wait (default 2)")
    s.add_argument("--dry-run", action="store_true", help="print the scripts; write and submit nothing")
    set_command(s, cmd_slurm_submit)
