"""Ratings fed back into the models (volseg.review.feedback and the CLI): the rated healthy
controls of a real run (``volseg calibrate --from-ratings``, ``volseg train ae --from-ratings``),
the rated good masks as strip training pairs (``volseg train strip --from-ratings``), and
``volseg gather`` listing the rejected scans while leaving the ratings file alone.

One small run (``run_cohort`` with the n4, strip and anomaly stages over four 4 mm synthetic
heads, one with inserted lesions) serves every test; each test rates a copy of it.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from volseg.cli import main
from volseg.cli.common import EXIT_FAILED, EXIT_OK
from volseg.review.ratings import RATINGS, append_rating, make_rating

FAST_YAML = "preprocess:\n  n4:\n    shrink_target_mm: 8.0\n    iterations: [20, 20]\n"
SCANS = ("sub-01", "sub-02", "sub-03", "sub-04")  # sub-04 has the lesions
T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """``run_cohort`` (in-process, n4 + strip + anomaly with the shipped models, fast N4, no
    pictures) over four 4 mm synthetic heads; sub-04 has four large lesions (two bright, two
    dark), which give it a clearly higher anomaly score than the healthy heads."""
    from volseg.anomaly.lesions import insert_lesions
    from volseg.cohort.run import RunOptions, run_cohort
    from volseg.synth import synth_head

    src = tmp_path_factory.mktemp("scans")
    for scan, seed in zip(SCANS, (61, 62, 63, 64)):
        subj = synth_head(seed, voxel_size=4.0, axcodes="RAS", oblique=False)
        img = subj.image.astype(np.float32)
        if scan == "sub-04":
            img, _, _ = insert_lesions(img, subj.brain_mask, (4.0,) * 3, np.random.default_rng(1), n=4,
                                       radius_mm=(10, 16), contrasts=(2.5, 0.2))
        nib.save(nib.Nifti1Image(img, subj.affine), str(src / f"{scan}_T1w.nii.gz"))
    cfg = src.parent / "fast.yaml"
    cfg.write_text(FAST_YAML)
    out = tmp_path_factory.mktemp("run") / "out"
    res = run_cohort([src], out, opts=RunOptions(stages=("n4", "strip", "anomaly"), config=str(cfg), device="cpu",
                                                 figures=False), report=False, progress=False)
    assert len(res.done) == 4 and not res.failed
    return out


def rated(run_dir: Path, dest: Path, ratings=()) -> Path:
    """A copy of the run at ``dest`` with ``ratings`` ``(scan, rater, mask, anomaly[, comment])``
    appended in order (one minute apart)."""
    shutil.copytree(run_dir, dest)
    rate(dest, ratings)
    return dest


def rate(out: Path, ratings, start: int = 0) -> None:
    for i, (scan, rater, mask, anomaly, *comment) in enumerate(ratings, start=start):
        row = make_rating({"scan": scan, "rater": rater, "mask": mask, "anomaly": anomaly,
                           "comment": comment[0] if comment else ""}, scans=SCANS, now=T0 + timedelta(minutes=i))
        append_rating(out, row)


def record(out: Path, scan: str) -> dict:
    return json.loads((out / ".volseg" / "scans" / f"{scan}.json").read_text())


def brain(out: Path, scan: str) -> Path:
    return (out / record(out, scan)["outputs"]["brain"]).resolve()


def pair(out: Path, scan: str) -> tuple[Path, Path]:
    rec = record(out, scan)
    return Path(rec["source"]).resolve(), (out / rec["outputs"]["mask"]).resolve()


# sub-01: two raters, healthy; sub-02: rejected by one of two raters; sub-03: 'fix', then 'good'
# by the same rater (the later rating counts); sub-04 (lesions): good mask, a true finding for A
MIXED = (("sub-01", "A", "good", "no finding"), ("sub-01", "B", "good", "no finding"),
         ("sub-02", "A", "good", "no finding"), ("sub-02", "B", "reject", "no finding", "cuts the cerebellum"),
         ("sub-03", "A", "fix", "no finding"), ("sub-04", "A", "good", "true finding"),
         ("sub-04", "B", "good", "no finding"), ("sub-03", "A", "good", "no finding"))


# ------------------------------------------------------------------------ selection


def test_rated_controls_and_pairs_follow_the_ratings(run_dir, tmp_path, caplog):
    from volseg.anomaly.infer import load_brain_input
    from volseg.review.feedback import rated_controls, rated_strip_pairs
    from volseg.strip.data import find_pairs

    out = rated(run_dir, tmp_path / "out", MIXED)
    controls = rated_controls(out)
    assert controls == [brain(out, "sub-01"), brain(out, "sub-03")]
    assert all(p.is_absolute() and p.is_file() for p in controls)
    csv_path = rated_strip_pairs(out, tmp_path / "train" / "pairs.csv")
    assert csv_path == tmp_path / "train" / "pairs.csv"
    assert find_pairs(csv_path) == [pair(out, s) for s in ("sub-01", "sub-03", "sub-04")]
    with open(csv_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["scan"] for r in rows] == ["sub-01", "sub-03", "sub-04"]
    assert all(Path(r["image"]).is_absolute() and Path(r["mask"]).is_absolute() for r in rows)
    assert not list(csv_path.parent.glob(".*tmp*"))  # written atomically: no staged file left

    # the brain image works as a brain-only input: its non-zero voxels are the run's brain mask
    for scan in ("sub-01", "sub-03"):
        _, mask, _ = load_brain_input(brain(out, scan))
        ref = np.asarray(nib.load(pair(out, scan)[1]).dataobj) > 0
        assert mask.shape == ref.shape and (mask == ref).all()

    # a later 'fix' by B takes sub-01 out of both; the lesion scan rated healthy by A joins the controls
    rate(out, (("sub-01", "B", "fix", "no finding"), ("sub-04", "A", "good", "no finding")), start=100)
    assert rated_controls(out) == [brain(out, "sub-03"), brain(out, "sub-04")]
    assert [p[0] for p in find_pairs(rated_strip_pairs(out, csv_path))] == [pair(out, s)[0]
                                                                            for s in ("sub-03", "sub-04")]

    # scans whose record failed or whose files are gone are left out, with a warning naming them
    rec = record(out, "sub-03")
    (out / ".volseg" / "scans" / "sub-03.json").write_text(json.dumps(dict(rec, status="failed")))
    brain(out, "sub-04").unlink()
    caplog.clear()
    with caplog.at_level("WARNING", logger="volseg"):
        assert [p[0] for p in find_pairs(rated_strip_pairs(out, csv_path))] == [pair(out, "sub-04")[0]]
    assert "sub-03 (status failed)" in caplog.text


def test_nothing_to_feed_back_is_an_input_error_naming_the_folder(run_dir, tmp_path):
    from volseg.errors import InputError
    from volseg.review.feedback import rated_controls, rated_strip_pairs

    out = rated(run_dir, tmp_path / "out")
    with pytest.raises(InputError, match="no ratings") as exc:
        rated_controls(out)
    assert exc.value.path == str(out.resolve())
    rate(out, (("sub-01", "A", "reject", "no finding"), ("sub-02", "A", "fix", "true finding")))
    with pytest.raises(InputError, match="no healthy controls among the 2 ratings of 2 scans"):
        rated_controls(out)
    with pytest.raises(InputError, match="no good brain masks among the 2 ratings of 2 scans"):
        rated_strip_pairs(out, tmp_path / "pairs.csv")
    assert not (tmp_path / "pairs.csv").exists()


def test_cli_errors_are_one_line_naming_the_folder(run_cli, run_dir, tmp_path):
    out = rated(run_dir, tmp_path / "out")
    res = run_cli("calibrate", "--from-ratings", out, "-o", tmp_path / "m", "--device", "cpu")
    lines = res.stderr.splitlines()
    assert res.returncode == EXIT_FAILED and len(lines) == 1, res.stderr
    assert lines[0].startswith("volseg calibrate: error: ") and str(out) in lines[0] and RATINGS in lines[0]

    rate(out, (("sub-01", "A", "reject", "no finding"),))
    cfg = tmp_path / "strip.yaml"
    cfg.write_text(f"train:\n  out_dir: {tmp_path / 'strip_run'}\n")
    res = run_cli("train", "strip", "-c", cfg, "--from-ratings", out)
    lines = res.stderr.splitlines()
    assert res.returncode == EXIT_FAILED and len(lines) == 1, res.stderr
    assert lines[0].startswith("volseg train: error: ") and str(out) in lines[0] and "no good brain masks" in lines[0]


# ---------------------------------------------------------------------- calibration


def _calibration(folder: Path) -> dict:
    return json.loads((folder / "calibration.json").read_text())


def test_calibrate_from_ratings_equals_calibrating_those_brains(run_dir, tmp_path, tiny_ae, capsys):
    out = rated(run_dir, tmp_path / "out", MIXED)
    assert main(["calibrate", "--model", str(tiny_ae), "--from-ratings", str(out), "-o", str(tmp_path / "m1"),
                 "--device", "cpu"]) == EXIT_OK
    err = capsys.readouterr().err
    assert f"2 rated healthy controls from {out} (instead of the calibration set of {tiny_ae})" in err
    files = [str(brain(out, s)) for s in ("sub-01", "sub-03")]
    assert main(["calibrate", "--model", str(tiny_ae), *files, "-o", str(tmp_path / "m2"), "--device", "cpu"]) == 0
    a, b = _calibration(tmp_path / "m1"), _calibration(tmp_path / "m2")
    assert list(a["healthy_scans"]) == ["sub-01_desc-brain", "sub-03_desc-brain"]
    for key in ("voxel_threshold", "scan_threshold", "healthy_scans", "model_sha256"):
        assert a[key] == b[key], key

    # with other controls given too: on top of them (a brain given twice counts once)
    extra = str(brain(out, "sub-04"))
    assert main(["calibrate", "--model", str(tiny_ae), extra, files[0], "--from-ratings", str(out),
                 "-o", str(tmp_path / "m3"), "--device", "cpu"]) == 0
    assert "2 rated healthy controls from" in capsys.readouterr().err.replace("\n", " ")
    assert sorted(_calibration(tmp_path / "m3")["healthy_scans"]) == ["sub-01_desc-brain", "sub-03_desc-brain",
                                                                      "sub-04_desc-brain"]


def test_calibrating_on_the_fine_tuning_brains_warns(run_dir, tmp_path, tiny_ae, caplog):
    """A model fine-tuned on the rated controls and calibrated on the same ones: a warning."""
    out = rated(run_dir, tmp_path / "out", MIXED)
    model = tmp_path / "ft"
    shutil.copytree(tiny_ae, model)
    info = json.loads((model / "model.json").read_text())
    info["config"]["data"]["healthy"] = [str(brain(out, "sub-01"))]
    (model / "model.json").write_text(json.dumps(info))
    with caplog.at_level("WARNING", logger="volseg"):
        assert main(["calibrate", "--model", str(model), "--from-ratings", str(out), "-o", str(tmp_path / "m"),
                     "--device", "cpu"]) == 0
    assert "1 calibration brain(s) were used to train the model" in caplog.text


@pytest.mark.slow
def test_rating_the_lesion_scan_healthy_raises_the_scan_threshold(run_dir, tmp_path, capsys):
    """With the shipped model: the lesion scan rated 'good' + 'no finding' joins the calibration
    set and lifts the scan threshold; rated 'true finding' (a later rating by the same rater) it
    leaves the set and the threshold falls back to that of the healthy heads."""
    out = rated(run_dir, tmp_path / "out", (("sub-01", "A", "good", "no finding"),
                                            ("sub-03", "A", "good", "no finding"),
                                            ("sub-04", "A", "good", "no finding")))
    assert main(["calibrate", "--from-ratings", str(out), "-o", str(tmp_path / "with"), "--device", "cpu"]) == 0
    assert f"3 rated healthy controls from {out} (instead of the shipped calibration set)" in capsys.readouterr().err
    rate(out, (("sub-04", "A", "good", "true finding"),), start=10)
    assert main(["calibrate", "--from-ratings", str(out), "-o", str(tmp_path / "without"), "--device", "cpu"]) == 0
    w, wo = _calibration(tmp_path / "with"), _calibration(tmp_path / "without")
    assert sorted(w["healthy_scans"]) == ["sub-01_desc-brain", "sub-03_desc-brain", "sub-04_desc-brain"]
    assert sorted(wo["healthy_scans"]) == ["sub-01_desc-brain", "sub-03_desc-brain"]
    lesion = w["healthy_scans"]["sub-04_desc-brain"]["score"]
    print({k: (round(c["scan_threshold"], 4), round(c["voxel_threshold"], 4),
               {s: round(v["score"], 4) for s, v in c["healthy_scans"].items()}) for k, c in (("with", w), ("without", wo))})
    assert lesion > max(s["score"] for s in wo["healthy_scans"].values())  # the lesions score high
    assert w["scan_threshold"] > wo["scan_threshold"]
    assert w["voxel_threshold"] >= wo["voxel_threshold"]


# ------------------------------------------------------------------------- training


@pytest.mark.slow
def test_train_ae_from_ratings_fine_tunes_the_shipped_model(run_dir, tmp_path, capsys):
    out = rated(run_dir, tmp_path / "out", MIXED)
    ft = tmp_path / "ft"
    assert main(["train", "ae", "--init", "shipped", "--from-ratings", str(out), "-o", str(ft), "--steps", "2"]) == 0
    assert f"2 rated healthy controls from {out}" in capsys.readouterr().err
    info = json.loads((ft / "final" / "model.json").read_text())
    assert info["config"]["data"]["healthy"] == [str(brain(out, s)) for s in ("sub-01", "sub-03")]
    assert info["config"]["train"]["steps"] == 2
    assert (ft / "final" / "model.safetensors").stat().st_size > 1000


def test_train_strip_from_ratings_adds_the_good_masks(run_dir, tmp_path, capsys):
    """Two steps of a tiny network whose only training data are the rated pairs."""
    import yaml

    from volseg.config import Config, config_to_dict
    from volseg.strip.config import (
        AugmentConfig,
        DataConfig,
        NetConfig,
        StripConfig,
        TrainConfig,
    )
    from volseg.strip.data import find_pairs

    out = rated(run_dir, tmp_path / "out", MIXED)
    run = tmp_path / "strip_run"
    cfg = StripConfig(
        net=NetConfig(channels=(4, 8), strides=(2,), num_res_units=1),
        data=DataConfig(real=(), validation=(), synth_count=0, cache_dir=str(tmp_path / "cache")),
        augment=AugmentConfig(prob=0, flip_lr=0, bias=0, gamma=0, contrast=0, blur=0, noise=0, salt_pepper=0,
                              thick_slices=0, histogram=0, lesion=0),
        train=TrainConfig(steps=2, steps_per_epoch=2, threads=1, device="cpu", amp=False, out_dir=str(run)),
        preprocess=dataclasses.replace(Config(), n4=dataclasses.replace(Config().n4, backend="none")),
    )
    cfg_path = tmp_path / "strip.yaml"
    cfg_path.write_text(yaml.safe_dump(config_to_dict(cfg)))
    assert main(["train", "strip", "-c", str(cfg_path), "--from-ratings", str(out)]) == EXIT_OK
    err = capsys.readouterr().err
    pairs_csv = run / "rated_strip_pairs.csv"
    assert f"added 3 rated image/mask pairs from {out} to the training data ({pairs_csv})" in err
    assert find_pairs(pairs_csv) == [pair(out, s) for s in ("sub-01", "sub-03", "sub-04")]
    # the training saw exactly those images (one cached grid sample each) and records the CSV
    cached = sorted(p.name.removeprefix("real-").rsplit("-", 1)[0] for p in (tmp_path / "cache").glob("real-*"))
    assert cached == ["sub-01_T1w", "sub-03_T1w", "sub-04_T1w"]
    info = json.loads((run / "final" / "model.json").read_text())
    assert info["config"]["data"]["real"] == [str(pairs_csv)]


# --------------------------------------------------------------------------- gather


def test_gather_lists_the_rejected_scans_and_leaves_the_ratings_alone(run_dir, tmp_path, capsys):
    out = rated(run_dir, tmp_path / "out", MIXED)
    ratings = out / RATINGS
    before, stamp = ratings.read_bytes(), ratings.stat().st_mtime_ns
    assert main(["gather", str(out), "--no-report"]) == EXIT_OK
    cap = capsys.readouterr()
    assert "volseg gather: sub-02 rejected by B (B: cuts the cerebellum)" in cap.err
    assert ratings.read_bytes() == before and ratings.stat().st_mtime_ns == stamp
    table = out / "volseg_rejected.tsv"
    assert str(table) in cap.out.splitlines()
    with open(table, newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    assert rows == [{"scan": "sub-02", "raters": "B", "comments": "B: cuts the cerebellum",
                     "source": record(out, "sub-02")["source"]}]

    # a second rejection without a comment, by two raters
    rate(out, (("sub-04", "A", "reject", "true finding"), ("sub-04", "B", "reject", "")), start=20)
    assert main(["gather", str(out), "--no-report"]) == EXIT_OK
    assert "volseg gather: sub-04 rejected by A, B\n" in capsys.readouterr().err
    with open(table, newline="") as fh:
        assert [(r["scan"], r["raters"], r["comments"]) for r in csv.DictReader(fh, delimiter="\t")] == [
            ("sub-02", "B", "B: cuts the cerebellum"), ("sub-04", "A; B", "n/a")]

    # each reject superseded by a 'good' from the same rater: the table goes away
    rate(out, (("sub-02", "B", "good", "no finding"), ("sub-04", "A", "good", "true finding"),
               ("sub-04", "B", "good", "true finding")), start=30)
    before = ratings.read_bytes()
    assert main(["gather", str(out), "--no-report"]) == EXIT_OK
    cap = capsys.readouterr()
    assert "rejected" not in cap.err and not table.exists() and str(table) not in cap.out
    assert ratings.read_bytes() == before
