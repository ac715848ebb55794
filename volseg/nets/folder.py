"""Model folders: everything inference needs for one network, in one folder.

A model folder (nnU-Net's ``plans.json`` + ``dataset.json`` beside the weights) holds:

- ``model.safetensors``: the weights (never unpickled);
- ``model.json``: the network's shape (``net``), its ``kind`` (``strip`` or ``ae``), the
  weights file's ``sha256`` and the training settings (``config``), including the
  preprocessing the network was trained with, which inference uses instead of the user's;
- ``calibration.json`` (anomaly models): thresholds set on healthy brains, tied to the
  weights by their sha256;
- ``MODEL_CARD.md`` and pictures, for people.

Both networks (the strip U-Net and the anomaly autoencoder) go through this one module;
inference and training meet only here and in :mod:`volseg.nets`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

from volseg.errors import VolsegError

PACKAGE_MODELS = Path(__file__).resolve().parent.parent / "models"
MODEL_FILE = "model.json"
CALIBRATION_FILE = "calibration.json"
KINDS = ("strip", "ae")


class WeightsError(VolsegError):
    """A model folder whose weights are missing, corrupt or do not match their checksum."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_dir(path: Path | str | None, kind: str) -> Path:
    """The folder ``path``, or the shipped model of ``kind`` when ``path`` is None."""
    if kind not in KINDS:
        raise ValueError(f"model kind must be one of {KINDS}, got {kind!r}")
    return Path(path) if path else PACKAGE_MODELS / kind


def is_package_dir(path: Path | str) -> bool:
    """Whether ``path`` lies inside the installed package's shipped models."""
    try:
        Path(path).resolve().relative_to(PACKAGE_MODELS.resolve())
        return True
    except ValueError:
        return False


def write_model(net, net_cfg, dest_dir: Path, extra: dict | None = None, half: bool = True) -> Path:
    """Save weights (float16 by default: half the size, same predictions to ~1e-3) and their
    ``model.json`` (``extra`` adds keys, e.g. ``kind``, ``config``, ``validation``)."""
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
    tmp = dest_dir / f".{MODEL_FILE}.tmp"
    tmp.write_text(json.dumps(info, indent=2, default=str) + "\n")
    tmp.replace(dest_dir / MODEL_FILE)
    return weights


def read_info(folder: Path, kind: str) -> dict:
    """``model.json`` of a model folder, checked to be readable."""
    info_path = Path(folder) / MODEL_FILE
    if not info_path.exists():
        what = "an anomaly" if kind == "ae" else "a strip"
        raise WeightsError(f"{folder}: no {MODEL_FILE}; this is not {what} model folder "
                           f"(train one with 'volseg train {kind}')")
    try:
        info = json.loads(info_path.read_text())
    except json.JSONDecodeError as exc:
        raise WeightsError(f"{info_path}: not valid JSON ({exc})") from None
    if not isinstance(info, dict) or "net" not in info:
        raise WeightsError(f"{info_path}: no 'net' entry; not a volseg model folder")
    found = info.get("kind", "strip")
    if found != kind:
        raise WeightsError(f"{folder}: holds a '{found}' model, but a '{kind}' model is needed here")
    return info


def build_net(info: dict, kind: str, source: str = MODEL_FILE):
    """The untrained network that ``info['net']`` describes."""
    from volseg.config import config_from_dict

    if kind == "ae":
        from volseg.nets.autoencoder import AENetConfig, build_autoencoder

        return build_autoencoder(config_from_dict(info["net"], AENetConfig, source=source))
    from volseg.nets.unet import NetConfig, build_unet

    return build_unet(config_from_dict(info["net"], NetConfig, source=source))


def load_model(folder: Path | str | None = None, kind: str = "strip", device="cpu"):
    """``(net, info)``: the network of ``model.json`` with its checked safetensors weights,
    in eval mode on ``device``; ``folder`` None: the shipped model of ``kind``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = model_dir(folder, kind)
    info = read_info(folder, kind)
    weights = folder / info.get("weights", "model.safetensors")
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
    net = build_net(info, kind, source=str(folder / MODEL_FILE))
    try:
        net.load_state_dict({k: v.float() for k, v in state.items()})
    except RuntimeError as exc:
        raise WeightsError(f"{weights}: weights do not fit the network in {MODEL_FILE} ({exc})") from None
    net.eval().to(device)
    net.volseg_info = info  # type: ignore[attr-defined]
    return net, info


def init_weights(net, folder: Path | str, kind: str, net_cfg) -> dict:
    """Load a model folder's checked weights into ``net`` to start a training from them
    (fine-tuning); returns the folder's info. Its network settings must equal ``net_cfg``
    (fine-tuning keeps the architecture)."""
    from volseg.config import config_from_dict

    src, info = load_model(folder, kind=kind, device="cpu")
    theirs = config_from_dict(info.get("net") or {}, type(net_cfg), source=str(Path(folder) / MODEL_FILE))
    if theirs != net_cfg:
        raise WeightsError(f"{folder}: its network ({theirs}) differs from the config's ({net_cfg}); "
                           "fine-tuning keeps the architecture")
    net.load_state_dict(src.state_dict())
    return info


def model_config(info: dict, cls, folder: Path | str = ""):
    """The training settings stored in ``model.json`` (``config``) as a ``cls`` instance;
    the defaults of ``cls`` where the model stored none."""
    from volseg.config import config_from_dict

    return config_from_dict(info.get("config") or {}, cls, source=str(Path(folder) / MODEL_FILE))


def read_calibration(folder: Path | str, info: dict, required: bool = False) -> dict | None:
    """``calibration.json`` of the folder, checked to belong to these weights; None if absent."""
    path = Path(folder) / CALIBRATION_FILE
    if not path.exists():
        if required:
            raise WeightsError(f"{folder}: no {CALIBRATION_FILE}; run 'volseg calibrate' first")
        return None
    try:
        calib = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise WeightsError(f"{path}: not valid JSON ({exc})") from None
    if calib.get("model_sha256") != info.get("sha256"):
        raise WeightsError(f"{path}: calibrated for another model (sha256 {str(calib.get('model_sha256'))[:12]}..."
                           f", weights {str(info.get('sha256'))[:12]}...); run 'volseg calibrate'")
    return calib


def write_calibration(calib: dict, dest_dir: Path | str) -> Path:
    """``calibration.json`` in ``dest_dir``; an object under ``calib['normative']`` (with a
    ``save(folder)`` method) is saved beside it."""
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    calib = dict(calib)
    extra = calib.pop("normative", None)
    if extra is not None:
        extra.save(dest_dir)
    tmp = dest_dir / f".{CALIBRATION_FILE}.tmp"
    tmp.write_text(json.dumps(calib, indent=2) + "\n")
    tmp.replace(dest_dir / CALIBRATION_FILE)
    return dest_dir / CALIBRATION_FILE


COPIED = ("model.json", "MODEL_CARD.md", "learning_curve.png", "normative.npz")


def copy_model_folder(src_dir: Path | str, dest_dir: Path | str, calibration: dict | None = None,
                      maps: dict | None = None) -> Path:
    """A complete model folder at ``dest_dir``: the weights and ``model.json`` of ``src_dir``
    (copied unless it is the same folder; ``maps``: a new ``config.maps`` section for it), and
    ``calibration.json`` when given, written last. Refuses to write into the installed package's
    shipped models."""
    src, dest = Path(src_dir).resolve(), Path(dest_dir).resolve()
    if is_package_dir(dest):
        raise WeightsError(f"{dest}: will not write into the installed package's models; "
                           "name another folder with -o")
    dest.mkdir(parents=True, exist_ok=True)
    if src != dest:
        info = json.loads((src / MODEL_FILE).read_text())
        for name in (info.get("weights", "model.safetensors"),) + COPIED:
            if (src / name).exists():
                tmp = dest / f".{name}.tmp"
                shutil.copyfile(src / name, tmp)
                tmp.replace(dest / name)
    if maps:
        info = json.loads((dest / MODEL_FILE).read_text())
        info.setdefault("config", {})["maps"] = maps
        tmp = dest / f".{MODEL_FILE}.tmp"
        tmp.write_text(json.dumps(info, indent=2) + "\n")
        tmp.replace(dest / MODEL_FILE)
    if calibration is not None:
        write_calibration(calibration, dest)
    return dest


__all__ = ["PACKAGE_MODELS", "CALIBRATION_FILE", "MODEL_FILE", "WeightsError", "sha256", "model_dir",
           "is_package_dir", "write_model", "read_info", "build_net", "load_model", "init_weights", "model_config",
           "read_calibration", "write_calibration", "copy_model_folder"]
