"""`volseg slurm submit`: the scripts it prints (--dry-run), and real runs on a single-node SLURM
cluster that the tests start themselves (munged, slurmctld, slurmd; see tests/slurm_cluster.py).

The cluster tests skip, with the reason, where the SLURM/munge binaries are missing or the suite
does not run as root; `.ci/run` installs them. A cluster that is installed but fails to start is
an error, not a skip.
"""

from __future__ import annotations

import csv
import json
import os
import re
import textwrap
import time
from pathlib import Path

import pytest

import slurm_cluster

# ---------------------------------------------------------------------------------- dry run


def _scripts(text: str) -> dict[str, str]:
    parts = re.split(r"^# ==> (.+)$", text, flags=re.M)
    return {Path(name).name: body for name, body in zip(parts[1::2], parts[2::2])}


def test_dry_run_prints_array_range_parallelism_dependency_and_resources(run_cli, tmp_path):
    scans = []
    for i in range(7):
        scans.append(tmp_path / f"sub-{i:02d}_T1w.nii.gz")
        scans[-1].write_bytes(b"")  # only counted, never read
    out = tmp_path / "out"
    res = run_cli("slurm", "submit", *scans, "-o", out, "--scans-per-task", "3",
                  "--array-parallelism", "2", "--partition", "short", "--time", "00:30:00",
                  "--mem", "6G", "--cpus-per-task", "4", "--stages", "n4,strip",
                  "--sbatch-arg=--account=lab", "--dry-run")
    assert res.returncode == 0, res.stderr
    scripts = _scripts(res.stdout)
    assert set(scripts) == {"array.sbatch", "gather.sbatch", "submit.sh"}
    array, gather, submit = scripts["array.sbatch"], scripts["gather.sbatch"], scripts["submit.sh"]

    # ceil(7 / 3) = 3 tasks, at most 2 at once; every task gets the resources asked for
    assert "#SBATCH --array=0-2%2\n" in array
    for opt in ("--partition=short", "--time=00:30:00", "--mem=6G", "--cpus-per-task=4", "--account=lab"):
        assert f"#SBATCH {opt}\n" in array, opt
    assert "--gpus" not in array
    # each task runs its shard of the whole cohort, with threads from SLURM_CPUS_PER_TASK
    run_line = next(line for line in array.splitlines() if " run " in line)
    assert '--shard "${SLURM_ARRAY_TASK_ID}/3"' in run_line
    assert all(str(s) in run_line for s in scans) and f"-o {out}" in run_line
    assert "--stages n4,strip" in run_line and '--threads "$threads"' in run_line
    assert 'threads="${SLURM_CPUS_PER_TASK:-1}"' in array and 'export OMP_NUM_THREADS="$threads"' in array

    # the gather job: one small task, after every array task whatever its exit (afterany)
    assert f"gather {out}" in gather and "#SBATCH --cpus-per-task=1\n" in gather
    assert "--array" not in gather and "#SBATCH --partition=short\n" in gather
    dep = re.search(r"sbatch --parsable --dependency=(\w+):\$\{array_id%%;\*\} --kill-on-invalid-dep=yes "
                    r"(\S+)\)", submit)
    assert dep and dep.group(1) == "afterany" and dep.group(2).endswith("slurm/gather.sbatch")
    assert "--wait" not in submit
    assert "3 tasks" in res.stderr and "7 scans" in res.stderr
    assert not out.exists(), "--dry-run must not write anything"


def test_dry_run_with_gpus_and_one_scan_per_task(run_cli, tmp_path):
    scans = [tmp_path / "a_T1w.nii.gz", tmp_path / "b_T1w.nii.gz"]
    for scan in scans:
        scan.write_bytes(b"")
    res = run_cli("slurm", "submit", *scans, "-o", tmp_path / "o", "--scans-per-task", "1",
                  "--gpus", "1", "--volseg-cmd", "apptainer run --nv /images/volseg.sif", "--dry-run")
    assert res.returncode == 0, res.stderr
    array = _scripts(res.stdout)["array.sbatch"]
    assert "#SBATCH --array=0-1\n" in array and "#SBATCH --gpus=1\n" in array
    assert "exec apptainer run --nv /images/volseg.sif run " in array and "--device cuda" in array


@pytest.mark.parametrize("args,message", [(["--scans-per-task", "0"], "at least 1"),
                                          (["--cpus-per-task", "0"], "at least 1")])
def test_bad_resources_are_usage_errors(run_cli, tmp_path, args, message):
    res = run_cli("slurm", "submit", tmp_path, "-o", tmp_path / "o", *args, "--dry-run")
    assert res.returncode == 2 and message in res.stderr


def test_submit_without_sbatch_says_what_to_do(run_cli, tmp_path):
    scan = tmp_path / "a_T1w.nii.gz"
    scan.write_bytes(b"")
    env = dict(os.environ, PATH=str(tmp_path / "empty"))
    res = run_cli("slurm", "submit", scan, "-o", tmp_path / "o", env=env)
    assert res.returncode == 1
    assert "'sbatch' not found" in res.stderr and "--dry-run" in res.stderr


# ---------------------------------------------------------------------------- real cluster


@pytest.fixture(scope="module")
def slurm():
    """A running single-node cluster (module scope); stopped by pid at the end."""
    reason = slurm_cluster.missing()
    if reason:
        pytest.skip(reason)
    cluster = slurm_cluster.LocalSlurm()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        cluster.cleanup()


# a stand-in for `volseg run`/`volseg gather`, to test the SLURM plumbing on its own: each
# shard records its arguments and thread settings, shard 1 fails, gather lists what it found
FAKE_VOLSEG = textwrap.dedent("""\
    #!/bin/bash
    cmd=$1; shift
    if [ "$cmd" = run ]; then
        while [ $# -gt 0 ]; do
            case $1 in -o) out=$2; shift;; --shard) shard=$2; shift;; --threads) threads=$2; shift;; esac
            shift
        done
        k=${shard%/*}
        echo "shard=$shard threads=$threads omp=$OMP_NUM_THREADS cpus=$SLURM_CPUS_PER_TASK" > "$out/shard-$k.txt"
        [ "$k" != 1 ] || { echo "scan-b	shard 1 broke" > "$out/shard-$k.failed"; exit 1; }
    elif [ "$cmd" = gather ]; then
        out=$1
        printf 'shard\\n' > "$out/volseg_summary.tsv"; ls "$out" | grep txt >> "$out/volseg_summary.tsv"
        printf 'scan\\terror\\n' > "$out/volseg_failures.tsv"; cat "$out"/*.failed >> "$out/volseg_failures.tsv"
    fi
""")


def test_array_and_gather_on_a_real_cluster_with_a_failing_task(slurm, run_cli, tmp_path):
    fake = tmp_path / "fake-volseg"
    fake.write_text(FAKE_VOLSEG)
    fake.chmod(0o755)
    scans = [tmp_path / f"s{i}_T1w.nii.gz" for i in range(5)]
    for s in scans:
        s.write_bytes(b"")
    out = tmp_path / "out"
    out.mkdir()
    t0 = time.monotonic()
    res = run_cli("slurm", "submit", *scans, "-o", out, "--scans-per-task", "2", "--cpus-per-task", "1",
                  "--mem", "500M", "--array-parallelism", "2", "--volseg-cmd", str(fake), "--wait",
                  "--poll", "0.5", env=slurm.env, timeout=180)
    took = time.monotonic() - t0
    assert res.returncode == 1, f"a failed task must give exit 1\n{res.stdout}\n{res.stderr}\n{slurm.logs()}"
    array_id = re.search(r"^array (\d+) \(3 tasks, 5 scans\)", res.stdout, re.M).group(1)
    assert re.search(r"^gather \d+ ", res.stdout, re.M)
    # all three tasks ran with their own shard and 1 thread (SLURM_CPUS_PER_TASK)
    for k in range(3):
        assert (out / f"shard-{k}.txt").read_text().split() == [f"shard={k}/3", "threads=1", "omp=1", "cpus=1"]
    # the gather job ran although task 1 failed, and --wait reported both
    summary = (out / "volseg_summary.tsv").read_text().split()
    assert summary == ["shard", "shard-0.txt", "shard-1.txt", "shard-2.txt"]
    assert "FAILED scan-b shard 1 broke" in res.stderr
    assert f"job {array_id}_1: FAILED" in res.stderr
    assert (out / "slurm" / "array.sbatch").exists() and (out / "slurm" / "logs").is_dir()
    jobs = list(csv.DictReader(open(out / "slurm" / "jobs.tsv"), delimiter="\t"))
    assert [j["array_id"] for j in jobs] == [array_id] and jobs[0]["tasks"] == "3"
    # polling squeue, not sbatch --wait's 32 s cadence
    assert took < 120, f"--wait took {took:.0f} s"


# ------------------------------------------------------------------- end to end: volseg run

FAST_YAML = "preprocess:\n  n4:\n    shrink_target_mm: 8.0\n    iterations: [20, 20]\n"


def _cohort(folder: Path) -> list[Path]:
    """Three 4 mm synthetic heads and one corrupt file."""
    import nibabel as nib

    from volseg.synth import synth_head

    folder.mkdir()
    paths = []
    for i in range(3):
        subj = synth_head(300 + i, voxel_size=4.0)
        img = nib.Nifti1Image(subj.image, subj.affine)
        img.set_qform(subj.affine, code=1)
        img.set_sform(subj.affine, code=1)
        paths.append(folder / f"sub-{i:02d}_T1w.nii.gz")
        nib.save(img, str(paths[-1]))
    bad = folder / "sub-bad_T1w.nii.gz"
    bad.write_bytes(paths[0].read_bytes()[:300])  # truncated
    return paths + [bad]


def _outputs(out: Path) -> dict[Path, int]:
    """mtime (ns) of every output, sidecar, picture and record of the good scans (the corrupt
    scan is retried on every run, so its failure record is rewritten)."""
    files = [p for p in out.glob("sub-*/**/*") if p.is_file()] + list((out / ".volseg" / "scans").glob("*.json"))
    files = [p for p in files if "sub-bad" not in p.name]
    return {p: p.stat().st_mtime_ns for p in files}


def _submit(run_cli, slurm, raw, out, cfg):
    res = run_cli("slurm", "submit", raw, "-o", out, "--stages", "n4,strip", "-c", cfg,
                  "--scans-per-task", "2", "--cpus-per-task", "1", "--mem", "3G", "--array-parallelism", "2",
                  "--wait", "--poll", "0.5", env=slurm.env, timeout=900)
    m = re.search(r"^array (\d+) \((\d+) tasks, (\d+) scans\)", res.stdout, re.M)
    assert m, f"no array id printed\n{res.stdout}\n{res.stderr}\n{slurm.logs()}"
    return res, m.group(1), int(m.group(2)), int(m.group(3))


def _task_logs(out: Path, array_id: str) -> str:
    return "\n".join(p.read_text() for p in sorted((out / "slurm" / "logs").glob(f"run_{array_id}_*.out")))


def test_cohort_array_on_a_real_cluster_records_failures_and_resumes(slurm, run_cli, tmp_path):
    import nibabel as nib
    import numpy as np

    scans = _cohort(tmp_path / "raw")
    cfg = tmp_path / "fast.yaml"
    cfg.write_text(FAST_YAML)
    out = tmp_path / "deriv"

    res, array_id, tasks, n = _submit(run_cli, slurm, tmp_path / "raw", out, cfg)
    assert (tasks, n) == (2, 4)
    assert res.returncode == 1, f"the corrupt scan must give exit 1\n{res.stderr}\n{_task_logs(out, array_id)}"
    # outputs for the three good scans, on their own grids; nothing for the corrupt one
    for src in scans[:3]:
        sid = src.name.split("_")[0]
        mask = out / sid / "anat" / f"{sid}_desc-brain_mask.nii.gz"
        assert mask.exists(), f"{mask} missing\n{_task_logs(out, array_id)}"
        m, s = nib.load(str(mask)), nib.load(str(src))
        assert m.shape == s.shape and np.allclose(m.affine, s.affine)
        assert 0 < np.asarray(m.dataobj).mean() < 0.6
        assert (out / sid / "anat" / f"{sid}_desc-preproc_T1w.nii.gz").exists()
    assert not list(out.glob("sub-bad/anat/*.nii.gz"))
    # both shards ran, and the gather job (after a failed task) merged them
    assert (out / "logs" / "shard-0-of-2_summary.tsv").exists() and (out / "logs" / "shard-1-of-2_summary.tsv").exists()
    rows = list(csv.DictReader(open(out / "volseg_summary.tsv"), delimiter="\t"))
    assert sorted((r["scan"], r["status"]) for r in rows) == [
        ("sub-00", "ok"), ("sub-01", "ok"), ("sub-02", "ok"), ("sub-bad", "failed")]
    fails = list(csv.DictReader(open(out / "volseg_failures.tsv"), delimiter="\t"))
    assert [f["scan"] for f in fails] == ["sub-bad"]
    assert "sub-bad_T1w.nii.gz" in fails[0]["error"] and fails[0]["stage"]
    assert (out / "report.html").exists()
    assert "FAILED" in res.stderr and "sub-bad" in res.stderr
    # the tasks ran with the threads SLURM gave them
    argv = [json.loads(p.read_text())["argv"] for p in (out / "logs").glob("volseg-run_*.json")]
    assert len(argv) == 2 and all(a[a.index("--threads") + 1] == "1" for a in argv)

    before = _outputs(out)
    assert len(before) > 12
    res2, array2, _, _ = _submit(run_cli, slurm, tmp_path / "raw", out, cfg)
    assert array2 != array_id
    assert res2.returncode == 1  # the corrupt scan is retried and fails again
    assert _outputs(out) == before, "a resubmission rewrote finished outputs"
    logs2 = _task_logs(out, array2)
    done = [int(x) for x in re.findall(r"volseg run: (\d+) done", logs2)]
    skipped = [int(x) for x in re.findall(r"(\d+) already complete", logs2)]
    assert len(done) == 2 and sum(done) == 0 and sum(skipped) == 3, logs2
    fails = list(csv.DictReader(open(out / "volseg_failures.tsv"), delimiter="\t"))
    assert [f["scan"] for f in fails] == ["sub-bad"]
    jobs = list(csv.DictReader(open(out / "slurm" / "jobs.tsv"), delimiter="\t"))
    assert [j["array_id"] for j in jobs] == [array_id, array2]
