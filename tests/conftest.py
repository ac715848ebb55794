"""Shared fixtures: the real-scan folder, the installed CLI, and a tiny synthetic head.

Real scans live outside the repository, in ``$VOLSEG_SHARED_DATA`` (default
``<repo>/../shared/data``); tests that need them skip when the folder is absent.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

TINY_SHAPE = (40, 48, 40)
TINY_ZOOM_MM = 4.0
TINY_SEED = 20240


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of real scans (``$VOLSEG_SHARED_DATA``, default ``<repo>/../shared/data``)."""
    env = os.environ.get("VOLSEG_SHARED_DATA")
    path = Path(env).expanduser() if env else REPO.parent / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"shared data not found at {path} (set VOLSEG_SHARED_DATA)")
    return path.resolve()


@pytest.fixture(scope="session")
def volseg_exe() -> Path:
    """The installed ``volseg`` console script: beside this Python, else the first on PATH."""
    name = "volseg.exe" if sys.platform == "win32" else "volseg"
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return beside
    found = shutil.which("volseg")
    if found:
        return Path(found)
    pytest.fail(f"no 'volseg' console script beside {sys.executable} or on PATH; "
                "install the package with `pip install -e .`")


@pytest.fixture(scope="session")
def run_cli(volseg_exe):
    """``run_cli(*args, **kw)`` runs ``volseg ARGS`` and returns the CompletedProcess.

    Output is captured as text and a non-zero exit does not raise: tests assert on
    ``returncode``, ``stdout`` and ``stderr`` themselves. Keyword arguments go to
    :func:`subprocess.run` (e.g. ``cwd``, ``env``, ``timeout``; the default timeout is 600 s).
    """

    def run(*args, **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("timeout", 600)
        return subprocess.run([str(volseg_exe), *map(str, args)], capture_output=True, text=True,
                              check=False, **kwargs)

    return run


def _ellipsoid(shape, centre, radii) -> np.ndarray:
    """Normalised squared radius ``sum(((x - c) / r)^2)`` over a voxel grid (1 on the surface)."""
    axes = [(np.arange(n, dtype=np.float32) - c) / r for n, c, r in zip(shape, centre, radii)]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    return x * x + y * y + z * z


def make_tiny_head(seed: int = TINY_SEED) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 40x48x40, 4 mm RAS head: (float32 image, uint8 brain mask, affine).

    Layers from outside in: background (noise around 0.02), a bright shell (scalp/skull, ~1.0),
    dark CSF (~0.15), and the brain (~0.6 with some texture), times a gentle bias field.
    The world origin is at the centre of the volume.
    """
    rng = np.random.default_rng(seed)
    shape = TINY_SHAPE
    centre = [(n - 1) / 2 for n in shape]
    head = _ellipsoid(shape, centre, (17.0, 21.0, 17.0))  # 68 x 84 x 68 mm half-axes
    inner = _ellipsoid(shape, centre, (14.5, 18.5, 14.5))  # inside the shell
    brain = _ellipsoid(shape, [centre[0], centre[1] + 0.5, centre[2] + 1.0], (12.5, 16.0, 12.0))

    img = np.full(shape, 0.02, dtype=np.float32)
    img[head <= 1] = 1.0
    img[inner <= 1] = 0.15
    mask = brain <= 1
    img[mask] = 0.6 + 0.05 * rng.standard_normal(int(mask.sum())).astype(np.float32)
    ramp = np.linspace(0.85, 1.15, shape[2], dtype=np.float32)  # bias along superior-inferior
    img = img * ramp[None, None, :]
    img = img + 0.02 * rng.standard_normal(shape).astype(np.float32)
    img = np.clip(img, 0, None).astype(np.float32) * 1000.0

    affine = np.diag([TINY_ZOOM_MM] * 3 + [1.0])
    affine[:3, 3] = -np.asarray(centre) * TINY_ZOOM_MM
    return img, mask.astype(np.uint8), affine


@pytest.fixture(scope="session")
def tiny_head(tmp_path_factory) -> tuple[Path, Path]:
    """(image, brain mask) NIfTI paths of :func:`make_tiny_head`, written with nibabel.

    Named ``sub-tiny_T1w.nii.gz`` (scan id ``sub-tiny``) and ``sub-tiny_T1w_brainmask.nii.gz``.
    Session-scoped: treat the files as read-only.
    """
    import nibabel as nib

    img, mask, affine = make_tiny_head()
    folder = tmp_path_factory.mktemp("tiny_head")
    paths = []
    for name, arr in (("sub-tiny_T1w.nii.gz", img), ("sub-tiny_T1w_brainmask.nii.gz", mask)):
        nii = nib.Nifti1Image(arr, affine)
        nii.set_qform(affine, code=1)
        nii.set_sform(affine, code=1)
        nii.header.set_xyzt_units("mm", "sec")
        nii.header.set_data_dtype(arr.dtype)
        nib.save(nii, folder / name)
        paths.append(folder / name)
    return paths[0], paths[1]


@pytest.fixture(scope="module")
def tiny_ae(tmp_path_factory) -> Path:
    """An uncalibrated random-weight residual autoencoder folder (model.safetensors + model.json;
    no N4 in its maps: quick)."""
    import torch

    from volseg.anomaly.config import AEConfig
    from volseg.config import config_from_dict, config_to_dict
    from volseg.nets.autoencoder import build_autoencoder
    from volseg.nets.folder import write_model

    tmp = tmp_path_factory.mktemp("tiny_ae")
    cfg = config_from_dict({
        "net": {"channels": [4, 8], "bottleneck": 4, "residual": True},
        "data": {"healthy": [], "synth_count": 0, "cache_dir": str(tmp / "cache")},
        "train": {"out_dir": str(tmp / "run"), "threads": 1, "amp": False},
        "maps": {"n4": False, "median_size": 3},
    }, AEConfig)
    torch.manual_seed(0)
    write_model(build_autoencoder(cfg.net), cfg.net, tmp / "model", {"config": config_to_dict(cfg), "kind": "ae"})
    return tmp / "model"
