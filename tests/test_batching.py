"""Batched network inference in ``volseg run``: the strip network and the autoencoder take
several scans per pass, and the results are those of one scan at a time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from test_cohort import FAST_YAML, STAGES, _masks, _rows, bids_root, fast_cfg, reference, write_head  # noqa: F401


@pytest.fixture(scope="module")
def heads(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("heads")
    return [write_head(root / f"h{seed}.nii.gz", seed) for seed in (41, 42, 43)]


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    from volseg.cohort.stages import build_context
    from volseg.strip.config import load_strip_config

    p = tmp_path_factory.mktemp("cfg") / "fast.yaml"
    p.write_text(FAST_YAML)
    return build_context(("n4", "strip", "anomaly"), load_strip_config(p), device="cpu", batch_size=4)


def test_strip_network_batch_equals_one_at_a_time(heads, ctx):
    from volseg.io import load_image
    from volseg.preprocess import prepare
    from volseg.strip.infer import predict_grid, predict_grid_batch

    grids = [prepare(*load_image(h), ctx.preprocess_cfg).grid_image for h in heads]
    batched = predict_grid_batch(ctx.strip_net, grids, "cpu")
    in_twos = predict_grid_batch(ctx.strip_net, grids, "cpu", batch_size=2, tta=True)
    for g, b, t in zip(grids, batched, in_twos):
        one = predict_grid(ctx.strip_net, g, "cpu")
        assert b.shape == g.shape and np.allclose(b.affine, g.affine)  # the trace rides along
        assert float(np.abs(np.asarray(b) - np.asarray(one)).max()) < 1e-4
        assert float(np.abs(np.asarray(t) - np.asarray(predict_grid(ctx.strip_net, g, "cpu", tta=True))).max()) < 1e-4
    # different scans give different maps: the batch is not one scan repeated
    assert float(np.abs(np.asarray(batched[0]) - np.asarray(batched[1])).max()) > 0.5


def test_autoencoder_batch_groups_equal_crops(ctx):
    from volseg.anomaly.maps import brain_bbox
    from volseg.anomaly.recon import reconstruct, reconstruct_batch

    rng = np.random.default_rng(0)
    shape = (96, 128, 160)
    zz = np.indices(shape)
    images, masks = [], []
    for centre, radii in (((48, 64, 80), (30, 40, 34)), ((47, 65, 79), (29, 41, 33)), ((48, 64, 80), (20, 24, 22))):
        m = sum(((zz[i] - centre[i]) / radii[i]) ** 2 for i in range(3)) <= 1
        img = np.where(m, 0.8 + 0.1 * rng.standard_normal(shape), 0).astype(np.float32)
        images.append(img)
        masks.append(m)
    boxes = [tuple(s.stop - s.start for s in brain_bbox(m, 4, 16, shape)) for m in masks]
    assert boxes[0] == boxes[1] != boxes[2]  # two share a pass, the third has its own
    net = ctx.anomaly_model.net
    got = reconstruct_batch(net, images, masks, "cpu")
    for img, m, r in zip(images, masks, got):
        one = reconstruct(net, img, m, "cpu")
        assert r.shape == shape and float(np.abs(r - one).max()) < 1e-4
        assert float(np.abs(r[m] - img[m]).mean()) < 0.5  # a reconstruction, not zeros


def test_compute_batch_isolates_a_bad_scan_and_matches_single_runs(heads, ctx, tmp_path):
    from volseg.cohort.stages import ScanFailure, compute_batch, compute_scan

    bad = tmp_path / "cut.nii.gz"
    bad.write_bytes(Path(heads[0]).read_bytes()[:3000])
    paths = [str(heads[0]), str(bad), str(heads[1])]
    res = compute_batch(paths, ctx)
    assert isinstance(res[1], ScanFailure) and str(bad) in res[1].error and res[1].stage == "load"
    for k in (0, 2):
        one = compute_scan(paths[k], ctx)
        assert res[k].mask.shape == one.mask.shape and (res[k].mask != one.mask).sum() <= 0.001 * one.mask.size
        assert res[k].anomaly.map.shape == one.anomaly.map.shape
        assert float(np.abs(res[k].anomaly.map - one.anomaly.map).max()) < 1e-3
        assert res[k].anomaly.score == pytest.approx(one.anomaly.score, abs=1e-4)
        assert res[k].anomaly.timings["reconstruct_batch"] == 2 and one.anomaly.timings["reconstruct_batch"] == 1
        assert set(res[k].timings) >= {"load_s", "n4_s", "strip_s", "anomaly_s"}


def test_chunks_cover_the_cohort_and_feed_every_worker():
    from volseg.cohort.run import chunks

    for n in range(0, 23):
        for batch in (1, 3, 4, 8):
            for jobs in (1, 2, 3):
                got = chunks(list(range(n)), batch, jobs)
                assert [x for c in got for x in c] == list(range(n))
                assert all(1 <= len(c) <= batch for c in got)
                assert len(got) >= min(n, jobs)


def test_bad_batch_size_is_a_usage_error(run_cli, tmp_path):
    res = run_cli("run", tmp_path, "-o", tmp_path / "o", "--batch-size", "0")
    assert res.returncode == 2 and "--batch-size" in res.stderr


def test_cli_batched_run_gives_the_masks_of_an_unbatched_run(run_cli, bids_root, fast_cfg, reference, tmp_path):
    """``--batch-size 3`` over the 4-scan BIDS cohort (a batch of 3 and one of 1, one worker)
    against the default run (one scan per pass on the CPU)."""
    out = tmp_path / "batched"
    res = run_cli("run", bids_root, "-o", out, "--stages", STAGES, "-c", fast_cfg, "--batch-size", "3")
    assert res.returncode == 0, res.stderr
    assert all(r["status"] == "ok" for r in _rows(out / "volseg_summary.tsv"))
    ref, got = _masks(reference), _masks(out)
    assert len(ref) == 4 and ref.keys() == got.keys()
    for k in ref:
        assert (ref[k] != got[k]).sum() <= 0.001 * ref[k].size, k
