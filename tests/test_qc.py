"""volseg.cohort.qc: the air's Rayleigh noise gives the true sigma, and SNR = brain mean / sigma."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from volseg.cohort.qc import BRAIN_ML_RANGE, MIN_AIR_VOXELS, air_noise_sigma, qc_measures, snr

SIGMA = 2.0
BRAIN_MEAN = 100.0
SHAPE = (72, 72, 72)
ZOOM_MM = 2.0


def _rayleigh(rng, shape, sigma=SIGMA):
    """Magnitude of complex Gaussian noise: Rayleigh with parameter ``sigma``."""
    return sigma * np.hypot(rng.standard_normal(shape), rng.standard_normal(shape))


def _head(seed=0):
    """(magnitude image, brain mask): scalp ~150, CSF ~30, brain BRAIN_MEAN, all with complex
    Gaussian noise of SIGMA, so the air is Rayleigh and the tissue Rician."""
    rng = np.random.default_rng(seed)
    c = (np.asarray(SHAPE) - 1) / 2
    x, y, z = np.meshgrid(*[np.arange(n) - cc for n, cc in zip(SHAPE, c)], indexing="ij")
    r2 = (x / 26) ** 2 + (y / 30) ** 2 + (z / 26) ** 2
    truth = np.zeros(SHAPE)
    truth[r2 <= 1] = 150.0
    truth[r2 <= 0.8] = 30.0
    brain = r2 <= 0.65
    truth[brain] = BRAIN_MEAN
    real = truth + SIGMA * rng.standard_normal(SHAPE)
    imag = SIGMA * rng.standard_normal(SHAPE)
    return np.hypot(real, imag).astype(np.float32), brain.astype(np.uint8)


def _result(img, mask, warnings=()):
    meta = SimpleNamespace(zooms=(ZOOM_MM,) * 3, header_warnings=tuple(warnings))
    return SimpleNamespace(meta=meta, prep=SimpleNamespace(native=img), mask=mask, anomaly=None)


def test_air_noise_sigma_undoes_the_rayleigh_spread():
    air = _rayleigh(np.random.default_rng(1), 200_000)
    # the two Rayleigh moments: std = sigma sqrt((4 - pi) / 2), mean = sigma sqrt(pi / 2)
    assert np.std(air) == pytest.approx(SIGMA * math.sqrt((4 - math.pi) / 2), rel=0.01)
    assert np.mean(air) == pytest.approx(SIGMA * math.sqrt(math.pi / 2), rel=0.01)
    assert air_noise_sigma(air) == pytest.approx(SIGMA, rel=0.02)
    assert snr(np.full(10, 100.0), air_noise_sigma(air)) == pytest.approx(50.0, rel=0.02)
    assert snr(np.full(10, 100.0), None) is None and snr(np.full(10, 100.0), 0.0) is None
    assert snr(np.array([]), 2.0) is None


def test_sigma_and_snr_of_a_head_with_rayleigh_air():
    img, brain = _head()
    m = qc_measures(_result(img, brain))
    true_snr = BRAIN_MEAN / SIGMA
    assert m["snr"] == pytest.approx(true_snr, rel=0.05)
    # the pieces, independently: the sigma from the air, the brain mean from the mask
    from volseg.cohort.qc import air_values

    assert air_noise_sigma(air_values(img)) == pytest.approx(SIGMA, rel=0.05)
    assert m["brain_volume_ml"] == pytest.approx(brain.sum() * ZOOM_MM ** 3 / 1000, abs=0.1)
    lo, hi = BRAIN_ML_RANGE
    assert (m["qc"] == "ok") == (lo <= m["brain_volume_ml"] <= hi)


def test_zero_padded_and_defaced_air_is_left_out():
    img, brain = _head(seed=2)
    img[:, :, :8] = 0  # zero padding below the head
    img[:, :10, :30] = 0  # a defaced block in front of the face
    assert air_noise_sigma(img[:6]) == pytest.approx(SIGMA, rel=0.05)  # air with zeros in it
    m = qc_measures(_result(img, brain))
    assert m["snr"] == pytest.approx(BRAIN_MEAN / SIGMA, rel=0.05)


def test_too_little_air_gives_no_snr():
    assert air_noise_sigma(np.ones(MIN_AIR_VOXELS - 1)) is None
    assert air_noise_sigma(np.zeros(10_000)) is None  # all padding, no noise
    img, brain = _head(seed=3)
    keep = np.zeros(SHAPE, bool)
    keep[:8, :8, :8] = True  # the air is zeroed (a masked input) except one corner
    img = np.where(keep | (img > 20), img, 0).astype(np.float32)
    m = qc_measures(_result(img, brain))
    assert m["snr"] is None and "brain_volume_ml" in m


def test_no_mask_no_volume_and_header_warnings_ask_for_a_check():
    img, _ = _head(seed=4)
    m = qc_measures(_result(img, None, warnings=["sform is not set; using the qform for both"]))
    assert "snr" not in m and "brain_volume_ml" not in m
    assert m["qc"] == "check" and m["qc_notes"] == ["sform is not set; using the qform for both"]
