"""The installed ``volseg`` command, run as a user would."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import nibabel as nib
import numpy as np

COMMANDS = (["preprocess"], ["synth"], ["strip"], ["train"], ["anomaly"], ["calibrate"], ["evaluate"], ["run"],
            ["gather"], ["slurm"], ["slurm", "submit"])


def test_help_is_fast_and_does_not_import_torch():
    code = ("import sys\nfrom volseg.cli import main\n"
            "for argv in ARGVS:\n"
            "    try:\n        main(argv)\n    except SystemExit as e:\n        assert e.code == 0, (argv, e.code)\n"
            "heavy = [m for m in ('torch', 'monai', 'nibabel', 'SimpleITK', 'numpy') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    argvs = [["--help"]] + [[*c, "--help"] for c in COMMANDS]
    res = subprocess.run([sys.executable, "-c", code.replace("ARGVS", repr(argvs))], capture_output=True, text=True,
                         check=False)
    assert res.returncode == 0, res.stderr
    assert all(c[-1] in res.stdout for c in COMMANDS)


def test_command_modules_import_only_common_and_the_library():
    """The arrows point down: volseg.cli imports the command modules, they import volseg.cli.common
    and library modules, never each other nor volseg.cli; common imports no command module."""
    import ast
    from pathlib import Path

    import volseg.cli

    folder = Path(volseg.cli.__file__).parent
    modules = {p.stem for p in folder.glob("*.py")} - {"__init__"}
    assert {"common", "preprocess", "strip", "anomaly", "train", "cohort", "slurm", "synth"} <= modules
    for name in sorted(modules):
        tree = ast.parse((folder / f"{name}.py").read_text())
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for t in targets:
                if t == "volseg.cli" or t.startswith("volseg.cli."):
                    assert name != "common" and t.startswith("volseg.cli.common"), (name, t)
    assert len((folder / "__init__.py").read_text().splitlines()) < 100  # builds the parser, nothing more


def test_python_dash_m_volseg_is_the_same_command():
    res = subprocess.run([sys.executable, "-m", "volseg", "strip", "--help"], capture_output=True, text=True,
                         check=False)
    assert res.returncode == 0 and res.stdout.startswith("usage: volseg strip")


def test_version(run_cli):
    from volseg import __version__

    res = run_cli("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"volseg {__version__}"


def test_preprocess_outputs(run_cli, tiny_head, tmp_path):
    image, _ = tiny_head
    out = tmp_path / "out"
    res = run_cli("preprocess", image, "-o", out)
    assert res.returncode == 0, res.stderr
    src = nib.load(str(image))
    native = nib.load(str(out / "sub-tiny_desc-preproc_T1w.nii.gz"))
    assert native.shape == src.shape
    assert np.allclose(native.affine, src.affine)
    assert native.get_data_dtype() == np.float32
    a, b = np.asarray(src.dataobj, float), np.asarray(native.dataobj, float)
    inside = a > np.percentile(a, 60)
    ratio = b[inside] / a[inside]  # a smooth field, not a rescaling: ratios near 1
    assert 0.5 < np.median(ratio) < 2.0 and np.corrcoef(a[inside], b[inside])[0, 1] > 0.8
    grid = nib.load(str(out / "sub-tiny_space-volseg_res-2_desc-preproc_T1w.nii.gz"))
    assert grid.shape == (96, 128, 160)
    assert np.allclose(np.abs(np.diag(grid.affine)[:3]), 2.0)
    side = json.loads((out / "sub-tiny_desc-preproc_T1w.json").read_text())
    assert side["Sources"][0].endswith("sub-tiny_T1w.nii.gz")
    assert side["N4"]["backend"] == "numpy" and side["N4"]["shrink"] == [1, 1, 1]
    assert side["Grid"]["grid_size"] == [96, 128, 160]
    assert side["GeneratedBy"][0]["Name"] == "volseg"
    assert "Config" in side and "Timings" in side


def test_mixed_batch_isolates_failures(run_cli, tiny_head, tmp_path):
    image, _ = tiny_head
    src = nib.load(str(image))
    inputs = tmp_path / "in"
    inputs.mkdir()
    good = inputs / "good_T1w.nii.gz"
    good.write_bytes(image.read_bytes())
    raw = gzip.decompress(image.read_bytes())
    (inputs / "trunc_T1w.nii.gz").write_bytes(gzip.compress(raw[: len(raw) // 3]))
    (inputs / "notes_T1w.nii.gz").write_text("this is not an image\n")
    data = np.asarray(src.dataobj, np.float32)
    nib.save(nib.Nifti1Image(np.stack([data, data], -1), src.affine), str(inputs / "series_T1w.nii.gz"))
    nib.save(nib.Nifti1Image(np.ones_like(data), src.affine), str(inputs / "flat_T1w.nii.gz"))
    withnan = data.copy()
    withnan[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(withnan, src.affine), str(inputs / "nan_T1w.nii.gz"))
    names = ["good", "trunc", "notes", "series", "flat", "nan"]
    out = tmp_path / "out"
    res = run_cli("preprocess", *[inputs / f"{n}_T1w.nii.gz" for n in names], inputs / "gone.nii.gz", "-o", out)
    assert res.returncode == 1
    for bad, msg in [("trunc", "truncated or corrupt"), ("notes", "not a readable"),
                     ("series", "4D series"), ("flat", "constant"), ("gone", "file not found")]:
        assert any(bad in line and msg in line for line in res.stderr.splitlines()), (bad, res.stderr)
    produced = sorted(p.name for p in out.iterdir())
    assert all(p.startswith(("good_", "nan_")) for p in produced), produced
    assert len(produced) == 8  # 2 scans x (native + grid) x (image + JSON); no temporaries
    assert "2 scans done, 5 failed" in res.stderr


def test_unwritable_output_folder(run_cli, tiny_head, tmp_path):
    image, _ = tiny_head
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the output folder should be")
    res = run_cli("preprocess", image, "-o", blocker / "out")
    assert res.returncode == 1
    assert "blocker" in res.stderr and "cannot create output folder" in res.stderr


def test_duplicate_ids_are_refused(run_cli, tiny_head, tmp_path):
    image, _ = tiny_head
    other = tmp_path / "x"
    other.mkdir()
    copy = other / image.name
    copy.write_bytes(image.read_bytes())
    res = run_cli("preprocess", image, copy, "-o", tmp_path / "out")
    assert res.returncode == 1 and "already used" in res.stderr


def test_synth_command(run_cli, tmp_path):
    res = run_cli("synth", "-o", tmp_path / "s", "-n", "1", "--lesions", "--seed", "3")
    assert res.returncode == 0, res.stderr
    img = nib.load(str(tmp_path / "s" / "sub-synth001_T1w.nii.gz"))
    mask = nib.load(str(tmp_path / "s" / "sub-synth001_desc-brain_mask.nii.gz"))
    assert img.ndim == 3 and mask.get_data_dtype() == np.uint8
    assert np.allclose(img.affine, mask.affine)
    assert (tmp_path / "s" / "sub-synth001_label-lesion_mask.nii.gz").exists()


def test_synth_command_writes_other_contrasts_with_their_bids_suffix(run_cli, tmp_path):
    res = run_cli("synth", "-o", tmp_path / "t2", "-n", "1", "--seed", "3", "--contrast", "t2")
    assert res.returncode == 0, res.stderr
    img = tmp_path / "t2" / "sub-synth001_T2w.nii.gz"
    assert res.stdout.strip() == str(img)
    sidecar = json.loads((tmp_path / "t2" / "sub-synth001_T2w.json").read_text())
    assert sidecar["contrast"] == "t2"
    t1 = run_cli("synth", "-o", tmp_path / "t1", "-n", "1", "--seed", "3")
    assert t1.returncode == 0, t1.stderr
    # same subject (same mask and grid), other contrast
    m2 = nib.load(str(tmp_path / "t2" / "sub-synth001_desc-brain_mask.nii.gz"))
    m1 = nib.load(str(tmp_path / "t1" / "sub-synth001_desc-brain_mask.nii.gz"))
    assert np.array_equal(np.asarray(m1.dataobj), np.asarray(m2.dataobj))
    assert np.allclose(m1.affine, m2.affine)
    assert not np.allclose(nib.load(str(img)).get_fdata(),
                           nib.load(str(tmp_path / "t1" / "sub-synth001_T1w.nii.gz")).get_fdata())
    bad = run_cli("synth", "-o", tmp_path / "x", "--contrast", "t3")
    assert bad.returncode != 0 and "invalid choice" in bad.stderr
