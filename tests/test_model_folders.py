"""Your own models everywhere: a strip model folder carries the preprocessing it was trained
with, and every entry point (library, ``volseg run``'s context, nipype) takes a model folder."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from volseg.config import Config, GridConfig, config_to_dict
from volseg.nets.unet import NetConfig

TINY_NET = NetConfig(channels=(4, 8, 16), strides=(2, 2), num_res_units=1)
OTHER_GRID = GridConfig(spacing_mm=3.0, size=(64, 96, 112), top_margin_mm=10.0)


@pytest.fixture(scope="module")
def other_grid_model(tmp_path_factory):
    """An untrained strip model folder whose model.json says it was trained on a 3 mm 64x96x112
    grid; its last bias is large, so it calls every voxel brain (a non-empty mask)."""
    import torch

    from volseg.nets import build_unet
    from volseg.nets.folder import write_model

    torch.manual_seed(0)
    net = build_unet(TINY_NET)
    with torch.no_grad():
        dict(net.named_parameters())["model.2.1.conv.unit0.conv.bias"].fill_(20.0)
    folder = tmp_path_factory.mktemp("model") / "strip_3mm"
    pre = config_to_dict(Config(grid=OTHER_GRID))
    write_model(net, TINY_NET, folder, extra={"kind": "strip", "config": {"preprocess": pre}})
    return folder


def test_strip_uses_the_grid_stored_with_its_model(other_grid_model, tiny_head):
    from volseg.io import load_image
    from volseg.nets.folder import load_model
    from volseg.strip.config import StripConfig
    from volseg.strip.infer import for_model, strip_volume

    net, _ = load_model(other_grid_model, kind="strip")
    cfg = StripConfig()  # the user's settings say 2 mm 96x128x160
    assert for_model(cfg, net).preprocess.grid == OTHER_GRID
    assert for_model(cfg, net).preprocess.n4 == cfg.preprocess.n4  # N4 stays the user's
    data, meta = load_image(tiny_head[0])
    mask, prep, _ = strip_volume(data, meta, net, cfg)
    assert tuple(prep.grid_image.shape[1:]) == OTHER_GRID.size
    assert np.allclose(np.diag(np.asarray(prep.grid_image.affine))[:3], 3.0)
    assert mask.shape == tuple(meta.shape)


def test_run_context_takes_the_model_grid_and_fingerprints_the_model(other_grid_model):
    from volseg.cohort.stages import build_context
    from volseg.strip.config import StripConfig

    ctx = build_context(("n4", "strip"), StripConfig(), strip_model=str(other_grid_model))
    shipped = build_context(("n4", "strip"), StripConfig())
    assert ctx.preprocess_cfg.grid == OTHER_GRID and shipped.preprocess_cfg.grid == GridConfig()
    assert ctx.fingerprints()["mask"] != shipped.fingerprints()["mask"]
    assert ctx.fingerprints()["preproc"] != shipped.fingerprints()["preproc"]  # another grid


def test_nipype_strip_takes_a_model_folder(other_grid_model, tiny_head, tmp_path):
    from volseg.interfaces import Strip

    res = Strip(in_file=str(tiny_head[0]), strip_model=str(other_grid_model)).run(cwd=str(tmp_path))
    side = json.loads(open(res.outputs.out_mask.replace(".nii.gz", ".json")).read())
    info = json.loads((other_grid_model / "model.json").read_text())
    assert side["Model"]["sha256"] == info["sha256"]
    assert nib.load(res.outputs.out_mask).shape == nib.load(str(tiny_head[0])).shape


def test_a_model_folder_of_the_wrong_kind_is_refused(other_grid_model):
    from volseg.anomaly.infer import load_anomaly_model
    from volseg.nets.folder import WeightsError

    with pytest.raises(WeightsError, match="'strip' model"):
        load_anomaly_model(other_grid_model)
