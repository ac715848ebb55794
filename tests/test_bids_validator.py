"""The official BIDS validator (bids-validator-deno) on the derivatives of a small ``volseg run``:
0 errors. Skips where the validator is not installed (``pip install bids-validator-deno``)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_cohort import FAST_YAML, write_head


def _validator() -> str | None:
    here = Path(sys.executable).parent / "bids-validator-deno"
    return str(here) if here.exists() else shutil.which("bids-validator-deno")


def _issues(root: Path, exe: str) -> list[dict]:
    res = subprocess.run([exe, str(root), "--format", "json"], capture_output=True, text=True, timeout=600)
    try:
        return json.loads(res.stdout)["issues"]["issues"]
    except (ValueError, KeyError):
        pytest.fail(f"bids-validator-deno gave no JSON report (exit {res.returncode}): {res.stderr[-2000:]}")


def test_run_outputs_pass_the_bids_validator(run_cli, tmp_path):
    exe = _validator()
    if exe is None:
        pytest.skip("bids-validator-deno is not installed (pip install bids-validator-deno)")
    raw = tmp_path / "raw"
    (raw / "sub-01" / "ses-1" / "anat").mkdir(parents=True)
    (raw / "dataset_description.json").write_text(json.dumps({"Name": "t", "BIDSVersion": "1.9.0"}))
    write_head(raw / "sub-01" / "ses-1" / "anat" / "sub-01_ses-1_T1w.nii.gz", 51)
    write_head(raw / "sub-02" / "anat" / "sub-02_run-1_T1w.nii.gz", 52)
    (tmp_path / "fast.yaml").write_text(FAST_YAML)
    out = tmp_path / "derivatives" / "volseg"
    res = run_cli("run", raw, "-o", out, "-c", tmp_path / "fast.yaml", "--stages", "n4,strip,anomaly")
    assert res.returncode == 0, res.stderr
    issues = _issues(out, exe)
    errors = [f"{i['code']} {i.get('subCode') or ''} {i.get('location')}" for i in issues if i["severity"] == "error"]
    assert errors == []
    # the validator did look at the outputs: the masks' sidecars are checked (no Type/Sources warning
    # would name them otherwise), and a broken sidecar is an error
    side = out / "sub-02" / "anat" / "sub-02_run-1_label-anomaly_mask.json"
    info = json.loads(side.read_text())
    side.write_text(json.dumps(dict(info, Type="Anomaly")))
    bad = [i for i in _issues(out, exe) if i["severity"] == "error"]
    assert any(i["code"] == "JSON_SCHEMA_VALIDATION_ERROR" for i in bad)



def _write_many(roots, barrier):
    from volseg.io.derivatives import write_bidsignore

    barrier.wait()
    for root in roots:
        write_bidsignore(root)


def test_bidsignore_survives_shards_writing_it_at_once(tmp_path):
    """The shards of a SLURM array all write ``.bidsignore`` when they start (a shared temporary
    name once made one of them fail with 'No such file or directory')."""
    import multiprocessing as mp

    from volseg.io.derivatives import BIDSIGNORE

    roots = [tmp_path / f"r{i}" for i in range(300)]
    for root in roots:
        root.mkdir()
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(4)
    procs = [ctx.Process(target=_write_many, args=(roots, barrier)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    for root in roots:
        assert (root / ".bidsignore").read_text().splitlines() == list(BIDSIGNORE)
        assert not list(root.glob(".bidsignore.tmp*"))
