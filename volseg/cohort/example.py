"""The embedded example cohort: a small BIDS dataset of synthetic heads, made on the spot.

Nothing is downloaded: the heads come from :mod:`volseg.synth` (deterministic by seed), laid
out as ``sub-01/ses-1``, ``sub-01/ses-2`` and ``sub-02`` (with lesions).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from volseg.io import AtomicWriter, check_writable_dir

log = logging.getLogger("volseg")

# (subject, session, seed, lesions)
EXAMPLE_SCANS = (("01", "1", 11, False), ("01", "2", 12, False), ("02", None, 13, True))


def example_cohort(root: str | Path, voxel_size=None) -> Path:
    """Write the example BIDS dataset to ``root`` (scans already there are kept) and return it."""
    from volseg.synth import synth_head, write_subject

    root = check_writable_dir(root)
    for sub, ses, seed, lesions in EXAMPLE_SCANS:
        anat = root / f"sub-{sub}" / (f"ses-{ses}" if ses else "") / "anat"
        name = f"sub-{sub}" + (f"_ses-{ses}" if ses else "")
        if (anat / f"{name}_T1w.nii.gz").exists():
            continue
        log.info("writing example scan %s (synthetic, seed %d)", name, seed)
        subj = synth_head(seed, lesions=lesions, voxel_size=voxel_size)
        paths = write_subject(subj, anat, name)
        # the truth masks are not BIDS raw data: keep them under sourcedata/
        truth = root / "sourcedata" / "truth"
        truth.mkdir(parents=True, exist_ok=True)
        for key in ("brain_mask", "lesion_mask"):
            if paths.get(key):
                Path(paths[key]).replace(truth / Path(paths[key]).name)
    desc = {"Name": "volseg example cohort (synthetic heads)", "BIDSVersion": "1.9.0",
            "DatasetType": "raw", "License": "CC0",
            "GeneratedBy": [{"Name": "volseg synth"}]}
    if not (root / "dataset_description.json").exists():
        with AtomicWriter() as w:
            w.save_text(json.dumps(desc, indent=2) + "\n", root / "dataset_description.json")
    return root
