"""Every output name and sidecar volseg writes, from one table (niworkflows' DerivativesDataSink).

Paths are built by pybids' ``build_path`` from BIDS entities and a volseg path pattern, in
one of two layouts:

- ``tree`` (``volseg run``): the BIDS-derivatives tree
  ``sub-X/[ses-Y/]anat/sub-X_[ses-Y_]..._desc-brain_mask.nii.gz``, QC pictures in
  ``sub-X/figures/``;
- ``flat`` (``volseg strip``/``anomaly``/``preprocess`` and the nipype interfaces): the same
  file names, ``<id>_desc-brain_mask.nii.gz``, in the folder given, for any input name.

Every image gets a JSON sidecar of the same name (:func:`sidecar`): BIDS' ``Sources``,
``GeneratedBy``, ``Description``, ``SkullStripped`` and, for masks, ``Type``; volseg adds the
input's geometry and the settings. Files BIDS has no name for (the anomaly map, the QC
pictures, the cohort tables and the report) are listed in ``.bidsignore`` (:data:`BIDSIGNORE`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from volseg import __version__

# BIDS entity keys in file names -> pybids entity names (anat entities, in BIDS order)
ENTITY_KEYS = {"sub": "subject", "ses": "session", "task": "task", "acq": "acquisition", "ce": "ceagent",
               "rec": "reconstruction", "dir": "direction", "run": "run", "mod": "modality", "echo": "echo",
               "flip": "flip", "inv": "inv", "mt": "mt", "part": "part", "chunk": "chunk"}
_SOURCE = "".join(f"[_{k}-{{{v}}}]" for k, v in ENTITY_KEYS.items() if k not in ("sub", "ses"))
_DERIVED = "[_space-{space}][_res-{resolution}][_label-{label}][_desc-{desc}]_{suffix}{extension}"
TREE_PATTERN = ("sub-{subject}[/ses-{session}]/{datatype<anat>|anat}/sub-{subject}[_ses-{session}]"
                + _SOURCE + _DERIVED)
FIGURE_PATTERN = "sub-{subject}/figures/sub-{subject}[_ses-{session}]" + _SOURCE + _DERIVED
FLAT_PATTERN = "{prefix}" + _DERIVED

# Names BIDS has no rule for: kept out of validation (the BIDS validator reads this file).
BIDSIGNORE = ("*_desc-anomaly_map.*", "*_desc-reconstruction_T1w.*", "sub-*/figures", "*.html", "*.tsv",
              "logs", ".volseg", "slurm")


@dataclass(frozen=True)
class Output:
    """One kind of output image: its entities, the stage that writes it and its sidecar."""

    entities: dict
    stage: str | None  # the volseg run stage that writes it (None: not a volseg run output)
    kind: str  # how the writer stores it: image | source | mask | map (see AtomicWriter.save_image)
    description: str
    fields: dict = field(default_factory=dict)  # fixed sidecar fields (Type, SkullStripped, ...)


OUTPUTS = {
    "preproc": Output({"desc": "preproc", "suffix": "T1w"}, "n4", "image",
                      "N4-corrected, input grid, intensities not rescaled", {"SkullStripped": False}),
    "grid": Output({"space": "volseg", "resolution": "2", "desc": "preproc", "suffix": "T1w"}, None, "image",
                   "N4-corrected and intensity-normalised on volseg's working grid (RAS, 2 mm, head-centred)",
                   {"SkullStripped": False}),
    "mask": Output({"desc": "brain", "suffix": "mask"}, "strip", "mask",
                   "brain mask of the skull-stripping network, input grid",
                   {"Type": "Brain", "SkullStripped": False}),
    "brain": Output({"desc": "brain", "suffix": "T1w"}, "strip", "source",
                    "input intensities (not N4-corrected) inside the brain mask", {"SkullStripped": True}),
    "anomaly_map": Output({"desc": "anomaly", "suffix": "map"}, "anomaly", "map",
                          "voxel-wise anomaly map: 3D-median-filtered autoencoder residual in white-matter "
                          "units, 0 outside the brain", {"SkullStripped": True}),
    "anomaly_mask": Output({"label": "anomaly", "suffix": "mask"}, "anomaly", "mask",
                           "anomaly map above the calibrated voxel threshold (candidate lesions)",
                           {"Type": "ROI", "SkullStripped": True}),
    "reconstruction": Output({"desc": "reconstruction", "suffix": "T1w"}, None, "image",
                             "autoencoder reconstruction of the brain", {"SkullStripped": True}),
}
# QC pictures (``volseg run``), in sub-X/figures/
FIGURES = {"mask": {"desc": "brain", "suffix": "qc", "extension": ".png"},
           "anomaly": {"desc": "anomaly", "suffix": "qc", "extension": ".png"}}


def entities(prefix: str) -> dict | None:
    """BIDS entities of an output prefix such as ``sub-01_ses-1_run-2``; None if the prefix is
    not made of known ``key-value`` pairs starting with ``sub-``."""
    ents = {}
    for part in prefix.split("_"):
        m = re.fullmatch(r"([a-z]+)-([A-Za-z0-9]+)", part)
        if not m or m.group(1) not in ENTITY_KEYS or ENTITY_KEYS[m.group(1)] in ents:
            return None
        ents[ENTITY_KEYS[m.group(1)]] = m.group(2)
    return ents if "subject" in ents else None


def _build(ents: dict, pattern: str) -> str:
    from bids.layout.writing import build_path

    path = build_path(ents, [pattern], strict=True)
    if path is None:
        raise ValueError(f"cannot name an output from {ents} with {pattern}")
    return path


def output_path(root: Path | str, key: str, prefix: str, tree: bool = False, extension: str = ".nii.gz") -> Path:
    """Where output ``key`` of the scan with output prefix ``prefix`` goes under ``root``."""
    ents = dict(OUTPUTS[key].entities, extension=extension)
    scan = entities(prefix) if tree else None
    if tree and scan is None:
        raise ValueError(f"output prefix {prefix!r} is not a BIDS name (sub-<label>[_ses-<label>]...)")
    rel = _build({**scan, **ents}, TREE_PATTERN) if tree else _build(dict(ents, prefix=prefix), FLAT_PATTERN)
    return Path(root) / rel


def output_paths(root: Path | str, prefix: str, keys, tree: bool = False) -> dict[str, Path]:
    return {k: output_path(root, k, prefix, tree) for k in keys}


def figure_path(root: Path | str, key: str, prefix: str) -> Path:
    """Where the QC picture ``key`` (``mask`` or ``anomaly``) of a scan goes under ``root``."""
    scan = entities(prefix)
    if scan is None:
        raise ValueError(f"output prefix {prefix!r} is not a BIDS name")
    return Path(root) / _build({**scan, **FIGURES[key]}, FIGURE_PATTERN)


def sidecar_path(image: Path | str) -> Path:
    """The JSON sidecar of an image output (same name, ``.json``)."""
    image = Path(image)
    for ext in (".nii.gz", ".nii", ".png"):
        if image.name.endswith(ext):
            return image.with_name(image.name[: -len(ext)] + ".json")
    return image.with_suffix(".json")


def sidecar(key: str, meta, cfg=None, sources=(), **extra) -> dict:
    """The JSON sidecar of output ``key``: BIDS fields, the input's geometry (``meta``), the
    preprocessing settings (``cfg``) and ``extra``. ``sources``: more inputs (BIDS URIs or
    paths) after the input scan itself."""
    from volseg.config import config_to_dict

    out = OUTPUTS[key]
    info = {"Description": out.description, **out.fields,
            "Sources": [str(Path(meta.path).resolve())] + [str(s) for s in sources],
            "SpatialReference": "the input scan's own grid (Sources[0])",
            "GeneratedBy": [{"Name": "volseg", "Version": __version__}],
            "Input": meta.summary()}
    if cfg is not None:
        info["Config"] = config_to_dict(cfg)
    info.update(extra)
    return info


def save_output(writer, root: Path | str, key: str, prefix: str, array: np.ndarray, meta, info: dict,
                tree: bool = False) -> Path:
    """Stage output ``key`` (image + sidecar ``info``) in ``writer`` (an AtomicWriter); returns
    the image's final path."""
    path = output_path(root, key, prefix, tree)
    writer.save_image(array, meta, path, kind=OUTPUTS[key].kind)
    writer.save_json(info, sidecar_path(path))
    return path


def write_bidsignore(root: Path | str) -> Path:
    """``.bidsignore`` at the derivatives root, with volseg's entries added to any already there."""
    path = Path(root) / ".bidsignore"
    lines = path.read_text().splitlines() if path.exists() else []
    new = lines + [e for e in BIDSIGNORE if e not in lines]
    if new != lines or not path.exists():
        # one temporary name per process: the shards of a SLURM array write this file at the same moment
        tmp = path.with_name(f".bidsignore.tmp{os.getpid()}")
        tmp.write_text("\n".join(new) + "\n")
        tmp.replace(path)
    return path


def bids_uri(root: Path | str, path: Path | str) -> str:
    """``bids::<path relative to the dataset root>``, the BIDS way to cite a file of this dataset."""
    return f"bids::{Path(path).relative_to(root).as_posix()}"


__all__ = ["OUTPUTS", "FIGURES", "BIDSIGNORE", "Output", "entities", "output_path", "output_paths", "figure_path",
           "sidecar_path", "sidecar", "save_output", "write_bidsignore", "bids_uri"]
