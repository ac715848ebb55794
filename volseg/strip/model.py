"""Shipped weights: safetensors + a JSON with the net config and the file's sha256.

Loading never unpickles: safetensors only, and the checksum must match before the
tensors are used.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from volseg.errors import VolsegError

PACKAGE_MODELS = Path(__file__).resolve().parent.parent / "models"


class WeightsError(VolsegError):
    """A weights file that is missing, corrupt or does not match its checksum."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_model(net, net_cfg, dest_dir: Path, extra: dict | None = None, half: bool = True) -> Path:
    """Save weights (float16 by default: half the size, same predictions to ~1e-3) and their JSON."""
    import dataclasses

    from safetensors.torch import save_file

    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.half() if half and v.is_floating_point() else v).contiguous().cpu()
               for k, v in net.state_dict().items()}
    weights = dest_dir / "model.safetensors"
    tmp = dest_dir / ".model.safetensors.tmp"
    save_file(tensors, str(tmp))
    tmp.replace(weights)
    info = {"net": dataclasses.asdict(net_cfg), "weights": weights.name, "sha256": sha256(weights)}
    info.update(extra or {})
    (dest_dir / "model.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
    return weights


def load_model(model_dir: Path | str | None = None, kind: str = "strip", device="cpu"):
    """Build the network described by ``model.json`` and load its checked safetensors weights."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from volseg.config import config_from_dict
    from volseg.nets import build_unet
    from volseg.strip.config import NetConfig

    model_dir = Path(model_dir) if model_dir else PACKAGE_MODELS / kind
    info_path = model_dir / "model.json"
    if not info_path.exists():
        raise WeightsError(f"{model_dir}: no model.json; train one with 'volseg train {kind}'")
    try:
        info = json.loads(info_path.read_text())
    except json.JSONDecodeError as exc:
        raise WeightsError(f"{info_path}: not valid JSON ({exc})") from None
    weights = model_dir / info.get("weights", "model.safetensors")
    if not weights.exists():
        raise WeightsError(f"{weights}: weights file missing")
    digest = sha256(weights)
    if digest != info.get("sha256"):
        raise WeightsError(
            f"{weights}: checksum mismatch (file {digest[:12]}..., expected "
            f"{str(info.get('sha256'))[:12]}...); the file is corrupt or was replaced, reinstall volseg"
        )
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(f"{weights}: cannot read weights ({exc})") from None
    if info.get("kind", kind) == "ae":
        from volseg.anomaly.config import AENetConfig
        from volseg.nets.autoencoder import build_autoencoder

        net = build_autoencoder(config_from_dict(info["net"], AENetConfig, source=str(info_path)))
    else:
        net = build_unet(config_from_dict(info["net"], NetConfig, source=str(info_path)))
    try:
        net.load_state_dict({k: v.float() for k, v in state.items()})
    except RuntimeError as exc:
        raise WeightsError(f"{weights}: weights do not fit the network in {info_path.name} ({exc})") from None
    net.eval().to(device)
    net.volseg_info = info  # type: ignore[attr-defined]
    return net, info


__all__ = ["WeightsError", "load_model", "write_model", "sha256"]
