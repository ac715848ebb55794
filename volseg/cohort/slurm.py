"""SLURM job arrays for cohorts: sbatch scripts, submission and waiting.

A cohort of ``n`` scans becomes one job array of ``ceil(n / scans_per_task)`` tasks; task ``K``
of ``N`` runs ``volseg run INPUT... -o OUT --shard K/N`` (the cohort stage's own sharding,
``cases[K::N]``, so the shards partition the cohort whatever the count), followed by one gather
job that runs ``volseg gather OUT`` to merge the shard summaries into
``OUT/volseg_summary.tsv``, ``OUT/volseg_failures.tsv`` and the report.

The gather job depends on the array with ``afterany``: it starts once every task has ended,
whether the task completed, failed, timed out or was cancelled, so a failed scan (or a whole
failed task) is still gathered and reported. ``afterok`` would never fire after a failure:
the gather job would stay PENDING forever (``DependencyNeverSatisfied``), or be cancelled
with ``--kill-on-invalid-dep=yes``, and the failures would go unrecorded either way.
``--kill-on-invalid-dep=yes`` is still set, for a dependency that cannot be met at all (an
array id the controller no longer knows).

The shard is passed explicitly as ``--shard ${SLURM_ARRAY_TASK_ID}/N`` rather than taken from
``SLURM_ARRAY_TASK_COUNT``: resubmitting a subset of tasks by hand (``sbatch --array=3,7``)
keeps the right ``N`` that way.

Resubmitting the same command resumes: ``volseg run`` skips scans whose outputs are complete.
Waiting polls ``squeue`` (every ``poll_s`` seconds), not ``sbatch --wait``, which polls every
32 s after the first minute; jobs that have left ``squeue`` are looked up with ``sacct``.
"""

from __future__ import annotations

import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from volseg.errors import VolsegError

SLURM_DIR = "slurm"
ARRAY_SCRIPT, GATHER_SCRIPT, SUBMIT_SCRIPT = "array.sbatch", "gather.sbatch", "submit.sh"
ACTIVE_STATES = frozenset({"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED",
                           "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESIZING", "RESV_DEL_HOLD",
                           "SIGNALING", "STAGE_OUT", "STOPPED", "SPECIAL_EXIT", "POWER_UP_NODE"})
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
               "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")


class SlurmError(VolsegError):
    """sbatch/squeue missing or refusing a job."""


@dataclass(frozen=True)
class Resources:
    """What each array task asks for. ``time``/``mem``/``partition`` of ``None`` leave the
    cluster's defaults; ``gpus`` > 0 also runs the tasks with ``--device cuda``."""

    partition: str | None = None
    time: str | None = None  # SLURM syntax: "MM", "HH:MM:SS", "D-HH:MM"
    mem: str | None = "8G"  # per task
    cpus_per_task: int = 2
    gpus: int = 0
    array_parallelism: int | None = None  # at most K tasks at once (the "%K" of --array)
    scans_per_task: int = 10
    extra_sbatch: tuple[str, ...] = ()  # further "#SBATCH" options, e.g. "--account=lab"

    def __post_init__(self):
        if self.cpus_per_task < 1:
            raise ValueError(f"--cpus-per-task must be at least 1, got {self.cpus_per_task}")
        if self.gpus < 0:
            raise ValueError(f"--gpus must be 0 or more, got {self.gpus}")
        if self.scans_per_task < 1:
            raise ValueError(f"--scans-per-task must be at least 1, got {self.scans_per_task}")
        if self.array_parallelism is not None and self.array_parallelism < 1:
            raise ValueError(f"--array-parallelism must be at least 1, got {self.array_parallelism}")


@dataclass(frozen=True)
class Plan:
    """A job array over a cohort: its scripts (name -> text) and the counts behind them."""

    out: Path
    n_scans: int
    n_tasks: int
    scripts: dict[str, str] = field(default_factory=dict)

    @property
    def folder(self) -> Path:
        return self.out / SLURM_DIR


def n_tasks(n_scans: int, scans_per_task: int) -> int:
    """Array size: ``ceil(n_scans / scans_per_task)`` (at least 1)."""
    if scans_per_task < 1:
        raise ValueError(f"scans_per_task must be at least 1, got {scans_per_task}")
    return max(1, math.ceil(n_scans / scans_per_task))


def count_scans(inputs: list[str], participants: tuple[str, ...] = ()) -> int:
    """How many scans ``volseg run INPUT...`` would process, by the cohort stage's own discovery
    (BIDS datasets, folders, lists, files; a refused duplicate still counts as a scan).

    Only the array size depends on it: the shards ``cases[K::N]`` partition the cohort for
    any ``N``, so a count that is off (files added later) costs balance, never scans.
    """
    from volseg.cohort.inputs import discover, split_duplicates

    keep, dups = split_duplicates(discover(list(inputs), tuple(participants)))
    return len(keep) + len(dups)


def default_volseg_command() -> str:
    """How the jobs start volseg: this interpreter with ``-m volseg`` (same install)."""
    return f"{shlex.quote(sys.executable)} -m volseg"


def _header(name: str, res: Resources, log: str, cpus: int, mem: str | None, gpus: int) -> list[str]:
    lines = ["#!/bin/bash", f"#SBATCH --job-name={name}", f"#SBATCH --output={log}",
             f"#SBATCH --cpus-per-task={cpus}"]
    if mem:
        lines.append(f"#SBATCH --mem={mem}")
    if res.time:
        lines.append(f"#SBATCH --time={res.time}")
    if res.partition:
        lines.append(f"#SBATCH --partition={res.partition}")
    if gpus:
        lines.append(f"#SBATCH --gpus={gpus}")
    lines += [f"#SBATCH {opt}" for opt in res.extra_sbatch]
    return lines


def _thread_exports() -> list[str]:
    return ['threads="${SLURM_CPUS_PER_TASK:-1}"'] + [f'export {v}="$threads"' for v in THREAD_VARS]


def build_plan(inputs: list[str], out: str | os.PathLike, n_scans: int, res: Resources = Resources(),
               volseg_cmd: str | None = None, run_args: list[str] | tuple[str, ...] = ()) -> Plan:
    """The array, gather and submit scripts for ``n_scans`` scans found in ``inputs``.

    ``run_args`` are further ``volseg run`` options (e.g. ``["--stages", "n4,strip"]``);
    ``volseg_cmd`` replaces the default ``python -m volseg`` (e.g. ``"apptainer run --nv
    volseg.sif"``). Paths are made absolute so the jobs do not depend on their working folder.
    """
    out = Path(out).absolute()
    folder = out / SLURM_DIR
    tasks = n_tasks(n_scans, res.scans_per_task)
    cmd = volseg_cmd or default_volseg_command()
    ins = " ".join(shlex.quote(str(Path(p).absolute())) for p in inputs)
    extra = list(run_args) + (["--device", "cuda"] if res.gpus and "--device" not in run_args else [])
    array = f"0-{tasks - 1}" + (f"%{res.array_parallelism}" if res.array_parallelism else "")
    logs = folder / "logs"

    run = _header("volseg-run", res, f"{logs}/run_%A_%a.out", res.cpus_per_task, res.mem, res.gpus)
    run.insert(2, f"#SBATCH --array={array}")
    run += ["", f"# volseg: {n_scans} scans in {tasks} tasks of up to {res.scans_per_task}; "
                "task K of N runs the shard cases[K::N]", "set -euo pipefail", *_thread_exports(),
            f'exec {cmd} run {ins} -o {shlex.quote(str(out))} --shard "${{SLURM_ARRAY_TASK_ID}}/{tasks}" '
            f'--threads "$threads"' + "".join(f" {shlex.quote(a)}" for a in extra), ""]

    gather = _header("volseg-gather", res, f"{logs}/gather_%j.out", 1, "2G", 0)
    gather += ["", "# runs after every array task has ended (afterany), whatever their exit codes,",
               "# and merges the shard summaries and failure records", "set -euo pipefail",
               *_thread_exports(), f"exec {cmd} gather {shlex.quote(str(out))}", ""]

    q = shlex.quote
    submit = ["#!/bin/bash", "# submit the array, then the gather job once every task has ended",
              "set -euo pipefail", f"mkdir -p {q(str(logs))}",
              f"array_id=$(sbatch --parsable {q(str(folder / ARRAY_SCRIPT))})",
              f"gather_id=$(sbatch --parsable --dependency=afterany:${{array_id%%;*}} "
              f"--kill-on-invalid-dep=yes {q(str(folder / GATHER_SCRIPT))})",
              'echo "array ${array_id%%;*} gather ${gather_id%%;*}"', ""]
    return Plan(out=out, n_scans=n_scans, n_tasks=tasks,
                scripts={ARRAY_SCRIPT: "\n".join(run), GATHER_SCRIPT: "\n".join(gather),
                         SUBMIT_SCRIPT: "\n".join(submit)})


def render(plan: Plan) -> str:
    """The scripts as one text, each under a ``# ==> path`` line (for ``--dry-run``)."""
    return "\n".join(f"# ==> {plan.folder / name}\n{text}" for name, text in plan.scripts.items())


def write_scripts(plan: Plan) -> dict[str, Path]:
    """Write the scripts into ``OUT/slurm/`` (temporary name, then rename) and make ``logs/``."""
    (plan.folder / "logs").mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, text in plan.scripts.items():
        dest = plan.folder / name
        tmp = dest.with_name(f".{name}.tmp")
        tmp.write_text(text)
        tmp.chmod(0o755)
        tmp.replace(dest)
        paths[name] = dest
    return paths


def _command(name: str) -> str:
    found = shutil.which(name)
    if not found:
        raise SlurmError(f"'{name}' not found on PATH: run on a SLURM login node (or load the "
                         "cluster's slurm module), or use --dry-run to only print the scripts")
    return found


def _sbatch(*args: str) -> str:
    res = subprocess.run([_command("sbatch"), "--parsable", *args], capture_output=True, text=True)
    if res.returncode != 0:
        raise SlurmError(f"sbatch {' '.join(args)} failed (exit {res.returncode}): {res.stderr.strip()}")
    return res.stdout.strip().split(";")[0]  # "ID" or "ID;cluster"


@dataclass(frozen=True)
class Submission:
    array_id: str
    gather_id: str
    plan: Plan


def submit(plan: Plan) -> Submission:
    """Write the scripts, submit the array and the gather job; record both in ``jobs.tsv``."""
    paths = write_scripts(plan)
    array_id = _sbatch(str(paths[ARRAY_SCRIPT]))
    try:
        gather_id = _sbatch(f"--dependency=afterany:{array_id}", "--kill-on-invalid-dep=yes",
                            str(paths[GATHER_SCRIPT]))
    except SlurmError as exc:
        raise SlurmError(f"{exc}; the array {array_id} was submitted and runs without a gather "
                         f"job: run 'volseg gather {plan.out}' when it ends") from exc
    record = plan.folder / "jobs.tsv"
    new = not record.exists()
    with open(record, "a") as fh:
        if new:
            fh.write("submitted\tarray_id\tgather_id\tscans\ttasks\n")
        fh.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')}\t{array_id}\t{gather_id}\t{plan.n_scans}\t{plan.n_tasks}\n")
    return Submission(array_id, gather_id, plan)


def job_states(job_ids: list[str]) -> dict[str, str]:
    """State of every job and array task (``"12_3"``) among ``job_ids``, from ``squeue``
    (which keeps finished jobs for ``MinJobAge``), for the rest from ``sacct`` when
    accounting is on; jobs found in neither are left out."""
    ids = ",".join(job_ids)
    res = subprocess.run([_command("squeue"), "-h", "-r", "-t", "all", "-j", ids, "-o", "%i|%T"],
                         capture_output=True, text=True)
    states = {}
    if res.returncode == 0:
        for line in res.stdout.splitlines():
            if "|" in line:
                jid, state = line.strip().split("|", 1)
                states[jid] = state.split()[0]
    seen = {j.split("_")[0] for j in states}
    gone = [j for j in job_ids if j not in seen]
    if gone and shutil.which("sacct"):
        acct = subprocess.run(["sacct", "-n", "-P", "-X", "-j", ",".join(gone), "-o", "JobID,State"],
                              capture_output=True, text=True)
        if acct.returncode == 0:  # fails with "accounting storage is disabled" without slurmdbd
            for line in acct.stdout.splitlines():
                if "|" in line:
                    jid, state = line.strip().split("|", 1)
                    states[jid] = state.split()[0]
    return states


def wait(job_ids: list[str], poll_s: float = 0.5, timeout_s: float | None = None,
         on_change=None) -> dict[str, str]:
    """Poll until none of ``job_ids`` (or their array tasks) is pending or running; returns
    the final states. ``on_change(states)`` is called whenever they change."""
    start, last = time.monotonic(), None
    missing_since = None
    while True:
        states = job_states(job_ids)
        if states != last and on_change:
            on_change(states)
        last = states
        active = [j for j, s in states.items() if s in ACTIVE_STATES]
        found = {j.split("_")[0] for j in states}
        if not active:
            if all(j in found for j in job_ids):
                return states
            # just submitted jobs are always listed; a job absent for long has been purged
            missing_since = missing_since or time.monotonic()
            if time.monotonic() - missing_since > 10 * poll_s + 5:
                return states
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            raise SlurmError(f"jobs {','.join(job_ids)} still running after {timeout_s:.0f} s: "
                             + ", ".join(f"{j} {states[j]}" for j in active[:10]))
        time.sleep(poll_s)


def read_failures(out: str | os.PathLike) -> list[dict[str, str]]:
    """Rows of ``OUT/volseg_failures.tsv`` (written by ``volseg gather``); [] when absent."""
    import csv

    path = Path(out) / "volseg_failures.tsv"
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        return [row for row in csv.DictReader(fh, delimiter="\t") if any((v or "").strip() for v in row.values())]


__all__ = ["Resources", "Plan", "Submission", "SlurmError", "build_plan", "render", "write_scripts",
           "submit", "job_states", "wait", "read_failures", "n_tasks", "count_scans",
           "default_volseg_command"]
