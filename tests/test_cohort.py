"""``volseg run`` / ``volseg gather`` on small synthetic cohorts (4 mm heads, a fast N4 setting),
through the installed CLI: BIDS paths, bad inputs, resume after SIGKILL, shards."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from volseg import __version__

STAGES = "n4,strip"  # the anomaly stage is tested with its own module
FAST_YAML = "preprocess:\n  n4:\n    shrink_target_mm: 8.0\n    iterations: [20, 20]\n"
# (subject, session, seed): two sessions for sub-01
BIDS_SCANS = (("01", "1", 31), ("01", "2", 32), ("02", None, 33), ("03", None, 34))
MASK_SUFFIXES = ("_desc-preproc_T1w", "_desc-brain_mask", "_desc-brain_T1w")


def write_head(path: Path, seed: int) -> Path:
    from volseg.synth import synth_head

    subj = synth_head(seed, voxel_size=4.0)
    img = nib.Nifti1Image(subj.image, subj.affine)
    img.set_qform(subj.affine, code=1)
    img.set_sform(subj.affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


@pytest.fixture(scope="module")
def fast_cfg(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("cfg") / "fast.yaml"
    p.write_text(FAST_YAML)
    return p


@pytest.fixture(scope="module")
def bids_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bids")
    (root / "dataset_description.json").write_text(json.dumps({"Name": "t", "BIDSVersion": "1.9.0"}))
    for sub, ses, seed in BIDS_SCANS:
        rel = Path(f"sub-{sub}") / (f"ses-{ses}" if ses else "") / "anat"
        name = f"sub-{sub}" + (f"_ses-{ses}" if ses else "") + "_T1w.nii.gz"
        write_head(root / rel / name, seed)
    return root


@pytest.fixture(scope="module")
def reference(run_cli, bids_root, fast_cfg, tmp_path_factory) -> Path:
    """An uninterrupted run over the BIDS cohort."""
    out = tmp_path_factory.mktemp("ref") / "deriv"
    res = run_cli("run", bids_root, "-o", out, "--stages", STAGES, "-c", fast_cfg)
    assert res.returncode == 0, res.stderr
    return out


def _prefix(sub, ses):
    return f"sub-{sub}" + (f"_ses-{ses}" if ses else "")


def _anat(out, sub, ses):
    return out / f"sub-{sub}" / (f"ses-{ses}" if ses else "") / "anat"


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def _snapshot(out: Path) -> dict[str, tuple[int, int]]:
    """(mtime_ns, inode) of every file except the logs."""
    return {str(p.relative_to(out)): (p.stat().st_mtime_ns, p.stat().st_ino)
            for p in out.rglob("*") if p.is_file() and "logs" not in p.relative_to(out).parts}


def _masks(out: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(nib.load(str(p)).dataobj)
            for p in sorted(out.rglob("*_desc-brain_mask.nii.gz"))}


def test_bids_sessions_map_to_derivative_paths(reference, bids_root):
    out = reference
    for sub, ses, _ in BIDS_SCANS:
        src = nib.load(str(_anat(bids_root, sub, ses) / f"{_prefix(sub, ses)}_T1w.nii.gz"))
        for suf in MASK_SUFFIXES:
            p = _anat(out, sub, ses) / f"{_prefix(sub, ses)}{suf}.nii.gz"
            img = nib.load(str(p))
            assert img.shape == src.shape, p
            np.testing.assert_allclose(img.affine, src.affine, atol=1e-5)
            side = json.loads(p.with_name(p.name.replace(".nii.gz", ".json")).read_text())
            assert side["Sources"][0].endswith(f"{_prefix(sub, ses)}_T1w.nii.gz")
            assert side["SkullStripped"] is (suf == "_desc-brain_T1w")
            assert len(side["Models"]["strip"]["sha256"]) == 64
            assert side["Settings"]["stages"] == ["n4", "strip"] and side["Timings"]["n4_s"] > 0
        mask = np.asarray(nib.load(str(_anat(out, sub, ses) / f"{_prefix(sub, ses)}_desc-brain_mask.nii.gz")).dataobj)
        assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
        assert (out / f"sub-{sub}" / "figures" / f"{_prefix(sub, ses)}_desc-brain_qc.png").stat().st_size > 5000
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"
    assert desc["GeneratedBy"][0]["Name"] == "volseg" and desc["GeneratedBy"][0]["Version"] == __version__

    # pybids reads the output as a derivatives dataset of the input, entities included
    from bids import BIDSLayout

    layout = BIDSLayout(str(bids_root), derivatives=str(out), validate=False)
    found = layout.get(scope="derivatives", desc="brain", suffix="mask", extension=".nii.gz")
    assert sorted((f.entities["subject"], f.entities.get("session")) for f in found) == \
        sorted((s, ses) for s, ses, _ in BIDS_SCANS)

    rows = _rows(out / "volseg_summary.tsv")
    assert [r["scan"] for r in rows] == sorted(_prefix(s, ses) for s, ses, _ in BIDS_SCANS)
    from volseg.cohort.qc import air_values
    from volseg.synth import synth_head

    seeds = {_prefix(s, ses): (s, ses, seed) for s, ses, seed in BIDS_SCANS}
    for r in rows:
        sub, ses, seed = seeds[r["scan"]]
        anat = _anat(out, sub, ses)
        mask = np.asarray(nib.load(str(anat / f"{r['scan']}_desc-brain_mask.nii.gz")).dataobj) > 0
        pre = nib.load(str(anat / f"{r['scan']}_desc-preproc_T1w.nii.gz"))
        vol = float(r["brain_volume_ml"])
        assert r["status"] == "ok" and vol == pytest.approx(mask.sum() * np.prod(pre.header.get_zooms()) / 1000, abs=0.1)
        assert vol == pytest.approx(synth_head(seed, voxel_size=4.0).params["brain_volume_ml"], rel=0.1)
        # SNR: brain mean over the sigma of the air outside head and brain; Rayleigh air has
        # std = sigma sqrt((4 - pi) / 2)
        img = np.asarray(pre.dataobj, dtype=np.float32)
        air = air_values(img, mask)  # outside the head and the brain mask
        sigma = np.std(air[air != 0]) / np.sqrt((4 - np.pi) / 2)
        assert float(r["snr"]) == pytest.approx(img[mask].mean() / sigma, rel=0.01)
        assert 0 < float(r["time_n4_s"]) <= float(r["time_total_s"])
        assert r["anomaly_score"] == "n/a"  # stage not run
    assert _rows(out / "volseg_failures.tsv") == []
    logs = list((out / "logs").glob("volseg-run_*.log"))
    assert logs and "done in" in logs[0].read_text()
    run_info = json.loads(next((out / "logs").glob("volseg-run_*.json")).read_text())
    assert run_info["versions"]["volseg"] == __version__ and run_info["scans"] == len(BIDS_SCANS)


def test_rerun_rewrites_nothing_and_overwrite_redoes(run_cli, reference, bids_root, fast_cfg):
    before = _snapshot(reference)
    res = run_cli("run", bids_root, "-o", reference, "--stages", STAGES, "-c", fast_cfg)
    assert res.returncode == 0, res.stderr
    assert "4 already complete" in res.stderr
    assert _snapshot(reference) == before
    # --overwrite redoes the selected scans only
    res = run_cli("run", bids_root, "-o", reference, "--stages", STAGES, "-c", fast_cfg,
                  "--participant-label", "02", "--overwrite")
    assert res.returncode == 0, res.stderr
    after = _snapshot(reference)
    redone = {k for k in after if after[k] != before.get(k)}
    assert "sub-02/anat/sub-02_desc-brain_mask.nii.gz" in redone
    assert not any(k.startswith("sub-01") or k.startswith("sub-03") for k in redone), redone


def test_mixed_folder_isolates_bad_inputs(run_cli, fast_cfg, tmp_path):
    src = tmp_path / "scans"
    good = [write_head(src / f"good{i}_T1w.nii.gz", 40 + i) for i in (1, 2)]
    raw = good[0].read_bytes()
    (src / "trunc_T1w.nii.gz").write_bytes(raw[: len(raw) * 2 // 3])
    (src / "text_T1w.nii.gz").write_text("this is not an image\n")
    (src / "empty_T1w.nii").write_bytes(b"")
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8, 3), np.float32), np.eye(4)), str(src / "series_T1w.nii.gz"))
    nib.save(nib.Nifti1Image(np.full((8, 8, 8), np.nan, np.float32), np.eye(4)), str(src / "nan_T1w.nii.gz"))
    nib.save(nib.Nifti1Image(np.ones((16, 16, 1), np.float32), np.eye(4)), str(src / "flat_T1w.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), str(src / "sub-zero_T1w.nii.gz"))
    zeropix = bytearray(write_head(src / "zeropix_T1w.nii", 43).read_bytes())  # a head, but:
    zeropix[80:92] = bytes(12)  # pixdim[1..3] = 0
    zeropix[252:256] = bytes(4)  # qform_code = sform_code = 0
    (src / "zeropix_T1w.nii").write_bytes(zeropix)
    lst = tmp_path / "more.txt"
    lst.write_text(f"# extra\n{tmp_path / 'missing_T1w.nii.gz'}\n")
    out = tmp_path / "out"

    res = run_cli("run", src, lst, "-o", out, "--stages", STAGES, "-c", fast_cfg)
    assert res.returncode == 1, res.stderr
    bad = {"trunc": "truncated or corrupt", "text": "not a readable", "empty": "empty (0 bytes)",
           "series": "4D series", "nan": "NaN", "flat": "2D", "zero": "empty (all voxels 0)",
           "missing": "file not found", "zeropix": "pixdim[1..3] contains 0"}
    fails = {r["scan"]: r for r in _rows(out / "volseg_failures.tsv")}
    assert set(fails) == {f"sub-{k}" for k in bad}, fails
    for name, words in bad.items():
        row = fails[f"sub-{name}"]
        assert words in row["error"] and f"{name}_T1w.nii" in row["error"], row
        assert row["stage"] == "load"
        assert not list(out.glob(f"sub-{name}/**/*")), f"outputs written for failed {name}"
        assert f"{name}_T1w.nii" in res.stderr
    for g in good:
        sid = "sub-" + g.name.split("_")[0]
        mask = nib.load(str(out / sid / "anat" / f"{sid}_desc-brain_mask.nii.gz"))
        src_img = nib.load(str(g))
        assert mask.shape == src_img.shape and np.allclose(mask.affine, src_img.affine)
    statuses = {r["scan"]: r["status"] for r in _rows(out / "volseg_summary.tsv")}
    assert statuses == {**{f"sub-{k}": "failed" for k in bad}, "sub-good1": "ok", "sub-good2": "ok"}
    assert not [p for p in out.rglob(".*tmp*")], "temporary files left behind"

    # a rerun leaves the finished scans alone and fails the bad ones again
    keep = {k: v for k, v in _snapshot(out).items() if k.startswith("sub-good")}
    res = run_cli("run", src, lst, "-o", out, "--stages", STAGES, "-c", fast_cfg)
    assert res.returncode == 1 and "2 already complete" in res.stderr
    assert {k: v for k, v in _snapshot(out).items() if k.startswith("sub-good")} == keep


def test_unwritable_output_and_bad_options(run_cli, tmp_path, bids_root):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = run_cli("run", bids_root, "-o", blocker / "out", "--stages", STAGES)
    assert res.returncode == 1 and str(blocker / "out") in res.stderr
    res = run_cli("run", bids_root, "-o", tmp_path / "o", "--stages", "strip,bogus")
    assert res.returncode == 2 and "bogus" in res.stderr
    res = run_cli("run", bids_root, "-o", tmp_path / "o", "--stages", "strip,anomaly")
    assert res.returncode == 2 and "needs the n4 and strip" in res.stderr
    assert not (tmp_path / "o").exists()


def _listed(run_cli, bids_root, out, *args, env=None):
    res = run_cli("run", bids_root, "-o", out, "--list", *args, env=env)
    assert res.returncode == 0, res.stderr
    return [line.split("\t")[0] for line in res.stdout.splitlines()]


def test_shards_partition_the_cohort(run_cli, bids_root, tmp_path):
    out = tmp_path / "o"
    every = _listed(run_cli, bids_root, out)
    assert len(every) == len(BIDS_SCANS)
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    parts = [_listed(run_cli, bids_root, out, "--shard", "0/3"),
             _listed(run_cli, bids_root, out, "--shard", "1/3"),
             # SLURM arrays numbered from 1 (--array=1-3): task 3 is shard 2
             _listed(run_cli, bids_root, out, env={**base, "SLURM_ARRAY_TASK_ID": "3",
                                                   "SLURM_ARRAY_TASK_COUNT": "3",
                                                   "SLURM_ARRAY_TASK_MIN": "1"})]
    assert sorted(sum(parts, [])) == sorted(every) and all(parts)
    assert _listed(run_cli, bids_root, out, "--participant-label", "sub-02") == \
        [p for p in every if "sub-02_T1w" in p]
    for bad in ("3/3", "-1/2", "1/0", "one/two"):
        res = run_cli("run", bids_root, "-o", out, "--shard", bad, "--list")
        assert res.returncode == 2 and "shard" in res.stderr, (bad, res.stderr)
    res = run_cli("run", bids_root, "-o", out, "--list",
                  env={**base, "SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "4"})
    assert res.returncode == 2 and "outside 0..3" in res.stderr


def test_sharded_run_with_workers_then_gather(run_cli, bids_root, fast_cfg, reference, tmp_path):
    out = tmp_path / "sharded"
    args = ("run", bids_root, "-o", out, "--stages", STAGES, "-c", fast_cfg)
    res = run_cli(*args, "--shard", "0/2")
    assert res.returncode == 0, res.stderr
    assert not (out / "volseg_summary.tsv").exists()
    assert len(_rows(out / "logs" / "shard-0-of-2_summary.tsv")) == 2
    res = run_cli("gather", out)
    assert res.returncode == 1 and "1/2" in res.stderr  # shard 1 has not run
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    # shard 1 from the SLURM variables, with two worker processes
    res = run_cli(*args, "--jobs", "2",
                  env={**env, "SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2"})
    assert res.returncode == 0, res.stderr
    res = run_cli("gather", out)
    assert res.returncode == 0, res.stderr
    rows = _rows(out / "volseg_summary.tsv")
    assert sorted(r["scan"] for r in rows) == sorted(_prefix(s, ses) for s, ses, _ in BIDS_SCANS)
    assert all(r["status"] == "ok" for r in rows)
    assert "sub-01_ses-2" in (out / "report.html").read_text()
    ref, got = _masks(reference), _masks(out)
    assert ref.keys() == got.keys() and all(np.array_equal(ref[k], got[k]) for k in ref)


def test_sigkill_mid_run_then_rerun_gives_identical_masks(volseg_exe, bids_root, fast_cfg,
                                                          reference, tmp_path):
    out = tmp_path / "killed"
    cmd = [str(volseg_exe), "run", str(bids_root), "-o", str(out), "--stages", STAGES, "-c", str(fast_cfg)]
    records = out / ".volseg" / "scans"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if records.is_dir() and any(p.suffix == ".json" and not p.name.startswith(".")
                                        for p in records.iterdir()):
                break
            time.sleep(0.05)
        time.sleep(0.8)  # into the next scan's work
        assert proc.poll() is None, "the run finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    done = [p for p in records.glob("*.json") if not p.name.startswith(".")]
    assert 1 <= len(done) < len(BIDS_SCANS), "kill should land mid-run"

    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert f"{len(done)} already complete" in res.stderr
    ref, got = _masks(reference), _masks(out)
    assert ref.keys() == got.keys()
    for k in ref:
        assert np.array_equal(ref[k], got[k]), f"{k} differs from the uninterrupted run"
    assert not [p for p in out.rglob(".*tmp*")], "temporary files left behind"


def test_restart_cleans_only_its_own_staged_files(tmp_path):
    from volseg.cohort.export import record_path, start_scan
    from volseg.cohort.inputs import Scan

    a = Scan("/x/sub-01_T1w.nii.gz", "01", None, "sub-01")
    b = Scan("/x/sub-01_run-2_T1w.nii.gz", "01", None, "sub-01_run-2")
    anat = tmp_path / "sub-01" / "anat"
    anat.mkdir(parents=True)
    mine = [anat / ".sub-01_desc-brain_mask.tmp77.nii.gz", anat / ".sub-01_desc-brain_mask.tmp77.json",
            tmp_path / "sub-01" / "figures" / ".sub-01_desc-brain_qc.png.tmp77"]
    theirs = [anat / ".sub-01_run-2_desc-brain_mask.tmp78.nii.gz",
              record_path(tmp_path, b).with_name(".sub-01_run-2.tmp78.json")]
    rec = record_path(tmp_path, a)
    for p in mine + theirs + [rec]:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("x")
    start_scan(tmp_path, a)
    assert not any(p.exists() for p in mine + [rec])
    assert all(p.exists() for p in theirs)


def test_overlapped_export_writes_the_same_outputs(reference, bids_root, fast_cfg, tmp_path):
    """--overlap on (the GPU default): each batch is exported in a thread while the next one is
    computed; the masks, images and records are those of the plain run."""
    from volseg.cohort.run import RunOptions, run_cohort

    out = tmp_path / "deriv"
    res = run_cohort([bids_root], out, opts=RunOptions(stages=tuple(STAGES.split(",")), config=str(fast_cfg),
                                                         device="cpu", overlap=True, figures=False),
                     report=False, progress=False)
    assert len(res.done) == len(BIDS_SCANS) and not res.failed
    for sub, ses, _ in BIDS_SCANS:
        for suf in MASK_SUFFIXES:
            name = f"{_prefix(sub, ses)}{suf}.nii.gz"
            ours = np.asarray(nib.load(str(_anat(out, sub, ses) / name)).dataobj)
            ref = np.asarray(nib.load(str(_anat(reference, sub, ses) / name)).dataobj)
            np.testing.assert_allclose(ours, ref, atol=1e-5, err_msg=name)
    assert {r["scan"] for r in _rows(out / "volseg_summary.tsv")} == {r["scan"] for r in _rows(reference / "volseg_summary.tsv")}
