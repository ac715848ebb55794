"""Site adaptation: fine-tune an anomaly model on a lab's own healthy controls, then calibrate it
on held-out controls of the same site (``volseg train ae --init``, ``volseg calibrate``); the
controls are found and skull-stripped by :func:`volseg.cohort.controls.control_brains`.

No shipped model knows every scanner; a lab's healthy controls teach it what healthy looks like
there. Controls are given as files, folders, list files or a BIDS dataset (with participant
labels), either as skull-stripped brains or, with ``heads=True``, as whole heads that volseg
skull-strips first.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def finetune_config(init_dir, brains, out_dir, steps: int = 300, lr: float = 1e-4, synth: int = 0,
                    threads: int | None = None, device: str | None = None, base=None):
    """The training settings of a fine-tuning run: the init model's own settings (network, grid,
    maps, corruption) with the lab's controls as the only real training brains, no validation
    brains, ``synth`` synthetic brains, ``steps`` steps at ``lr``, written to ``out_dir``.
    ``base`` (an :class:`~volseg.anomaly.config.AEConfig`, e.g. from ``-c``) replaces the init
    model's settings."""
    from volseg.anomaly.config import AEConfig
    from volseg.config import config_from_dict
    from volseg.nets.folder import WeightsError

    info_path = Path(init_dir) / "model.json"
    if base is None:
        if not info_path.exists():
            raise WeightsError(f"{init_dir}: no model.json; give a model folder to --init")
        stored = json.loads(info_path.read_text()).get("config")
        if not stored:
            raise WeightsError(f"{info_path}: has no training settings; give them with -c CONFIG")
        base = config_from_dict(stored, AEConfig, source=str(info_path))
    cache = Path(out_dir) / "cache"
    data = dataclasses.replace(base.data, healthy=tuple(str(b) for b in brains), validation=(),
                               synth_count=int(synth), cache_dir=str(cache))
    train = dataclasses.replace(base.train, steps=int(steps), lr=float(lr), out_dir=str(out_dir),
                                steps_per_epoch=max(1, min(base.train.steps_per_epoch, int(steps))),
                                **({"threads": int(threads)} if threads else {}),
                                **({"device": device} if device else {}))
    return dataclasses.replace(base, data=data, train=train)


__all__ = ["finetune_config"]
