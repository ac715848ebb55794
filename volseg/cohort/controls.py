"""Healthy controls of a site for ``volseg train ae --init`` and ``volseg calibrate``: found like a
cohort (files, folders, list files, BIDS with participant labels) and, for whole heads,
skull-stripped with the strip model first."""

from __future__ import annotations

from pathlib import Path


def control_brains(inputs, out_dir, participants=(), heads: bool = False, strip_model=None,
                   device="cpu") -> list[Path]:
    """The brain-only images of healthy controls: the inputs themselves, or (``heads``) their
    skull-stripped versions written to ``out_dir`` (reused when present)."""
    from volseg.cohort.inputs import discover
    from volseg.errors import InputError

    scans = discover(list(inputs), tuple(participants))
    if not scans:
        raise InputError(", ".join(map(str, inputs)), "no healthy control scans found")
    missing = [s.path for s in scans if not Path(s.path).exists()]
    if missing:
        raise InputError(missing[0], "file not found")
    if not heads:
        return [Path(s.path) for s in scans]
    from volseg.strip.config import load_strip_config
    from volseg.strip.infer import strip_file
    from volseg.nets.folder import load_model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    net = cfg = None
    brains = []
    for s in scans:
        dest = out / f"{s.prefix}_desc-brain_T1w.nii.gz"
        if not dest.exists():
            if net is None:
                net, _ = load_model(strip_model, kind="strip", device=device)
                cfg = load_strip_config(None)
            written = Path(strip_file(s.path, out, net, cfg, device, tta=True)["brain"])
            if written != dest:
                written.replace(dest)
        brains.append(dest)
    return brains


__all__ = ["control_brains"]
