"""The preprocessing stage: N4 on the native grid, then the head-centred 2 mm working grid.

Outputs per scan ``<id>`` (BIDS-derivatives style names):

- ``<id>_desc-preproc_T1w.nii.gz``: N4-corrected, on the input's own grid (same shape, affine
  and qform/sform codes), intensities not rescaled;
- ``<id>_space-volseg_res-2_desc-preproc_T1w.nii.gz``: the normalised image on the
  96x128x160, 2 mm, RAS working grid (``space-volseg``: head-centred, axis-aligned to the
  scanner's world axes; ``res-2``: 2 mm), the input every network of volseg sees;
- a JSON sidecar beside each (Sources, version, config, N4 settings, grid box, timings).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from volseg.config import Config, config_to_dict
from volseg.io import AtomicWriter, ImageMeta, load_image, scan_id


@dataclass
class Prepared:
    """A scan taken through the chain: what later stages need to predict and invert."""

    meta: ImageMeta
    native: np.ndarray  # N4-corrected, native grid
    log_field: np.ndarray
    data: dict  # the chain's output dict: "image" (MetaTensor on the grid) and "native"
    chain: object  # the Compose (its HeadGrid; Invertd can invert through it)
    timings: dict
    grid_qc: dict | None = None  # the strip network's own measures of this scan (strip_volume(qc=True))

    @property
    def grid_image(self):
        return self.data["image"]

    @property
    def grid(self):
        """The chain's :class:`~volseg.transforms.HeadGrid`, to put other volumes on the same grid."""
        from volseg.transforms import HeadGridd

        return next(t.grid for t in self.chain.transforms if isinstance(t, HeadGridd))


def prepare(data: np.ndarray, meta: ImageMeta, cfg: Config) -> Prepared:
    """N4 + working grid + normalisation on an array read by :func:`volseg.io.load_image`."""
    import torch
    from monai.data import MetaTensor

    from volseg.transforms import preprocess_chain

    chain = preprocess_chain(cfg)
    n4, rest = chain.transforms[0], chain.transforms[1:]
    t0 = time.perf_counter()
    d = n4({"image": MetaTensor(torch.as_tensor(data[None]), affine=torch.as_tensor(meta.affine))})
    t1 = time.perf_counter()
    for t in rest:
        d = t(d)
    t2 = time.perf_counter()
    native = d["native"][0].numpy()
    return Prepared(meta=meta, native=native, log_field=n4.n4.last_log_field, data=d, chain=chain,
                    timings={"n4_s": round(t1 - t0, 3), "grid_s": round(t2 - t1, 3)})


def grid_nifti(tensor):
    """A NIfTI image of a working-grid MetaTensor (its own affine, scanner codes)."""
    import nibabel as nib

    arr = np.asarray(tensor[0].detach().cpu().numpy(), dtype=np.float32)
    img = nib.Nifti1Image(arr, np.asarray(tensor.affine, dtype=float))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    return img


def preprocess_file(path: str, out_dir: str | Path, cfg: Config) -> dict[str, Path]:
    """Preprocess one scan into ``out_dir``; all files appear together or none do."""
    t0 = time.perf_counter()
    from volseg.io.derivatives import output_path, save_output, sidecar, sidecar_path

    data, meta = load_image(path, nonfinite=cfg.io.nonfinite)
    prep = prepare(data, meta, cfg)
    sid = scan_id(path)
    n4_info = prep.grid_image.meta.get("volseg_n4", {})
    grid_info = prep.grid_image.meta.get("volseg_grid", {})
    timings = dict(prep.timings, total_s=round(time.perf_counter() - t0, 3))
    with AtomicWriter() as w:
        native_path = save_output(w, out_dir, "preproc", sid, prep.native, meta,
                                  sidecar("preproc", meta, cfg, N4=n4_info, Grid=grid_info, Timings=timings))
        grid_path = w.save_nifti(grid_nifti(prep.grid_image), output_path(out_dir, "grid", sid))
        w.save_json(sidecar("grid", meta, cfg, N4=n4_info, Grid=grid_info,
                            Space="volseg: RAS, 2 mm, 96x128x160, head-centred",
                            IntensityNormalisation=config_to_dict(cfg.intensity), Timings=timings),
                    sidecar_path(grid_path))
    return {"native": native_path, "grid": grid_path}
