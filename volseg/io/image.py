"""Reading, validating and writing volumes (NIfTI-1/2 and MGH).

Reading returns the voxel array and an :class:`ImageMeta` holding everything needed to write
an output on exactly the input's grid (affine, shape, qform/sform codes, header); writing
consumes that meta (the split nnU-Net's reader/writer uses). Header validation follows
niworkflows' ``ValidateImage``: when qform and sform disagree the sform wins and the qform is
rewritten to match, with a warning.
"""

from __future__ import annotations

import logging
import os
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from volseg.errors import InputError, OutputError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".mgz", ".mgh")
# BIDS anatomical suffixes stripped from file names to form the scan id (case-insensitive).
BIDS_ANAT_SUFFIXES = (
    "T1w", "T2w", "PDw", "T2starw", "FLAIR", "inplaneT1", "inplaneT2", "PDT2", "UNIT1",
    "T1map", "T2map", "T2starmap", "R1map", "R2map", "PDmap", "angio", "MP2RAGE", "MPM",
)
MIN_ZOOM_MM, MAX_ZOOM_MM = 0.5, 7.0
# Voxels this far from axis alignment (degrees) are reported as oblique.
OBLIQUE_TOLERANCE_DEG = 0.5

# "source": the input's integer dtype when the values fit (a masked copy of the input), else float32
DTYPES = {"mask": np.uint8, "map": np.float32, "image": np.float32, "label": np.int16, "source": np.float32}


@dataclass(frozen=True)
class ImageMeta:
    """Geometry and provenance of a volume read by :func:`load_image`."""

    path: str
    affine: np.ndarray
    shape: tuple[int, int, int]
    zooms: tuple[float, float, float]
    qform_code: int = 1
    sform_code: int = 1
    header_warnings: tuple[str, ...] = ()
    source_dtype: str = "float32"
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def axcodes(self) -> str:
        import nibabel as nib

        return "".join(nib.aff2axcodes(self.affine))

    @property
    def oblique(self) -> bool:
        return obliquity_deg(self.affine) > OBLIQUE_TOLERANCE_DEG

    def summary(self) -> dict:
        """JSON-ready description used in sidecars."""
        return {
            "path": self.path,
            "shape": list(self.shape),
            "zooms_mm": [round(float(z), 6) for z in self.zooms],
            "orientation": self.axcodes,
            "oblique": bool(self.oblique),
            "affine": np.asarray(self.affine).round(6).tolist(),
            "qform_code": int(self.qform_code),
            "sform_code": int(self.sform_code),
            "header_warnings": list(self.header_warnings),
        }


def obliquity_deg(affine: np.ndarray) -> float:
    """Largest angle (degrees) between a voxel axis and its nearest world axis."""
    rot = np.asarray(affine, dtype=float)[:3, :3]
    cols = rot / np.linalg.norm(rot, axis=0, keepdims=True)
    cosines = np.clip(np.abs(cols).max(axis=0), -1.0, 1.0)
    return float(np.degrees(np.arccos(cosines)).max())


def scan_id(path: str | os.PathLike) -> str:
    """File name without its image extension and without a trailing BIDS suffix (``_T1w``)."""
    name = Path(path).name
    for ext in IMAGE_EXTENSIONS:
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
            break
    suffixes = "|".join(BIDS_ANAT_SUFFIXES)
    stripped = re.sub(rf"_(?:{suffixes})$", "", name, flags=re.IGNORECASE)
    return stripped or name


def _raw_nifti_header(img):
    """The NIfTI header exactly as stored: nibabel's load quietly "fixes" zero or negative
    pixdims to 1 or their absolute value, which would hide a header without voxel sizes."""
    holder = img.file_map.get("header") or img.file_map["image"]  # .hdr/.img pair, or one .nii
    with holder.get_prepare_fileobj(mode="rb") as fh:
        return img.header_class.from_fileobj(fh, check=False)


def _check_geometry_fields(path: str, img) -> None:
    """Refuse a NIfTI whose voxel sizes or coded qform/sform cannot place the voxels in space:
    pixdim[1..3] must be finite and positive (the qform and the voxel-size fallback are built
    from them); an sform or qform whose code is set must be finite and invertible."""
    import nibabel as nib

    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        return  # MGH: a zero or non-finite voxel size makes the affine singular, refused below
    try:
        hdr = _raw_nifti_header(img)
    except Exception:  # the header was read once already; keep nibabel's copy
        hdr = img.header
    pixdim = np.asarray(hdr["pixdim"][1:4], dtype=float)
    shown = ", ".join(f"{v:g}" for v in pixdim)
    if not np.all(np.isfinite(pixdim)):
        raise InputError(path, f"header pixdim[1..3] ({shown}) is not finite; the voxel size is unknown")
    if np.any(pixdim == 0):
        raise InputError(path, f"header pixdim[1..3] contains 0 ({shown}); the voxel size is unknown")
    if np.any(pixdim < 0):
        raise InputError(path, f"header pixdim[1..3] contains a negative voxel size ({shown})")
    for name, fields, code, get in (
        ("sform", "srow_x/srow_y/srow_z", int(hdr["sform_code"]), hdr.get_sform),
        ("qform", "quatern_b/c/d, qoffset_x/y/z", int(hdr["qform_code"]), hdr.get_qform),
    ):
        if code <= 0:
            continue
        try:
            aff = np.asarray(get(), dtype=float)
        except Exception:  # e.g. a quaternion with b^2 + c^2 + d^2 > 1
            aff = np.full((4, 4), np.nan)
        if not np.all(np.isfinite(aff)) or abs(np.linalg.det(aff[:3, :3])) < 1e-9:
            raise InputError(path, f"header {name} ({fields}) is zero, singular or not finite "
                                   f"although {name}_code is {code}")


def _validate_header(img) -> tuple[np.ndarray, int, int, list[str]]:
    """Pick the affine the way niworkflows' ValidateImage does; return it with codes and warnings."""
    import nibabel as nib

    warnings: list[str] = []
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        return np.asarray(img.affine, dtype=float), 1, 1, warnings
    hdr = img.header
    qform, qcode = hdr.get_qform(coded=True)
    sform, scode = hdr.get_sform(coded=True)
    qcode = int(qcode or 0)
    scode = int(scode or 0)
    if scode > 0 and sform is not None:
        affine = np.asarray(sform, dtype=float)
        if qcode > 0 and qform is not None and not np.allclose(qform, sform, atol=1e-3, rtol=0):
            warnings.append(
                "qform and sform disagree; using the sform and rewriting the qform to match "
                f"(largest difference {np.abs(np.asarray(qform) - sform).max():.3g})"
            )
        qcode = qcode if qcode > 0 else scode
    elif qcode > 0 and qform is not None:
        affine = np.asarray(qform, dtype=float)
        scode = qcode
        warnings.append("sform is not set; using the qform for both")
    else:
        affine = np.asarray(img.affine, dtype=float)
        qcode = scode = 0
        warnings.append(
            "neither qform nor sform is set; using the voxel sizes only (orientation unknown)"
        )
    return affine, qcode, scode, warnings


def load_image(path: str | os.PathLike, nonfinite: str = "zero") -> tuple[np.ndarray, ImageMeta]:
    """Read a 3D volume (or a 4D file holding one volume) as float32 plus its :class:`ImageMeta`.

    Raises :class:`InputError` naming the file for a missing, unreadable, truncated, 2D,
    multi-volume, empty or constant image, and for a header without a usable geometry (zero,
    negative or non-finite pixdim; a coded sform/qform that is zero or singular). Non-finite
    voxels are set to 0 with a warning (``nonfinite="zero"``) or refused (``nonfinite="error"``).
    """
    import nibabel as nib

    path = str(path)
    if not os.path.exists(path):
        raise InputError(path, "file not found")
    if os.path.isdir(path):
        raise InputError(path, "is a folder, not an image file")
    if os.path.getsize(path) == 0:
        raise InputError(path, "file is empty (0 bytes)")
    try:
        img = nib.load(path)
    except Exception as exc:  # nibabel raises many types for foreign files
        raise InputError(path, f"not a readable NIfTI or MGH image ({_short(exc)})") from None
    shape = tuple(int(s) for s in img.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    elif len(shape) == 4:
        raise InputError(
            path, f"is a 4D series with {shape[3]} volumes (shape {shape}); give one 3D volume"
        )
    if len(shape) > 4:
        raise InputError(path, f"has {len(shape)} dimensions (shape {shape}); give one 3D volume")
    if len(shape) < 3 or min(shape) < 2:
        raise InputError(path, f"is 2D (shape {tuple(img.shape)}); volseg needs a 3D volume")
    try:
        data = np.asarray(img.dataobj, dtype=np.float32).reshape(shape)
    except (EOFError, OSError, ValueError, zlib.error) as exc:
        raise InputError(path, f"image data is truncated or corrupt ({_short(exc)})") from None

    _check_geometry_fields(path, img)
    affine, qcode, scode, warnings = _validate_header(img)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InputError(path, "header affine is singular or not finite")
    zooms = tuple(float(z) for z in np.linalg.norm(affine[:3, :3], axis=0))
    if min(zooms) < MIN_ZOOM_MM * 0.5 or max(zooms) > MAX_ZOOM_MM * 1.5:
        raise InputError(
            path,
            f"voxel size {tuple(round(z, 3) for z in zooms)} mm is outside the supported "
            f"{MIN_ZOOM_MM}-{MAX_ZOOM_MM} mm range",
        )
    if min(zooms) < MIN_ZOOM_MM or max(zooms) > MAX_ZOOM_MM:
        warnings.append(f"voxel size {tuple(round(z, 3) for z in zooms)} mm is unusual")

    bad = ~np.isfinite(data)
    if bad.any():
        n_bad = int(bad.sum())
        if nonfinite == "error" or n_bad == data.size:
            raise InputError(path, f"contains {n_bad} NaN/Inf voxels")
        data[bad] = 0.0
        warnings.append(f"{n_bad} NaN/Inf voxels set to 0")
    lo, hi = float(data.min()), float(data.max())
    if hi - lo <= 1e-6 * max(1.0, abs(hi)):
        what = "empty (all voxels 0)" if hi == 0 else f"constant (all voxels = {hi:g})"
        raise InputError(path, f"image is {what}; nothing to process")

    for w in warnings:
        log.warning("%s: %s", path, w)
    meta = ImageMeta(
        path=path,
        affine=affine,
        shape=shape,  # type: ignore[arg-type]
        zooms=zooms,  # type: ignore[arg-type]
        qform_code=qcode,
        sform_code=scode,
        header_warnings=tuple(warnings),
        source_dtype=str(img.get_data_dtype()),
    )
    return data, meta


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) < 200 else text[:197] + "..."


def make_image(data: np.ndarray, meta: ImageMeta, kind: str = "image"):
    """A NIfTI-1 image of ``data`` on ``meta``'s grid with its affine and qform/sform codes."""
    import nibabel as nib

    if kind not in DTYPES:
        raise ValueError(f"unknown output kind {kind!r}; use one of {sorted(DTYPES)}")
    data = np.asarray(data)
    if tuple(data.shape) != tuple(meta.shape):
        raise ValueError(
            f"output for {meta.path} has shape {data.shape}, expected the input's {meta.shape}"
        )
    dtype = DTYPES[kind]
    if kind == "source" and np.issubdtype(np.dtype(meta.source_dtype), np.integer):
        info = np.iinfo(np.dtype(meta.source_dtype))
        if (data.size and info.min <= data.min() and data.max() <= info.max
                and np.array_equal(data, np.rint(data))):
            dtype = np.dtype(meta.source_dtype)  # the input's own integers, exactly
    if kind == "mask":
        data = (data > 0).astype(np.uint8)
    else:
        data = data.astype(dtype)
    img = nib.Nifti1Image(data, meta.affine)
    # Codes: keep the input's; an input without valid codes gets "scanner" (1) and a warning
    # was already given at load time.
    img.set_qform(meta.affine, code=int(meta.qform_code or 1))
    img.set_sform(meta.affine, code=int(meta.sform_code or 1))
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_data_dtype(dtype)
    if kind == "mask":
        img.header["cal_min"], img.header["cal_max"] = 0, 1
    return img


def check_writable_dir(folder: str | os.PathLike) -> Path:
    """Create ``folder`` if needed and make sure files can be written into it."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(folder, f"cannot create output folder ({exc.strerror or exc})") from None
    if not folder.is_dir():
        raise OutputError(folder, "output path exists and is not a folder")
    probe = folder / f".volseg-write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OutputError(folder, f"output folder is not writable ({exc.strerror or exc})") from None
    return folder


GZIP_LEVEL = 1  # nibabel's own default level for .nii.gz


def write_nifti(img, path: str | os.PathLike) -> None:
    """``nib.save`` for NIfTI-1, with ``.nii.gz`` compressed by ISA-L (``isal``, the igzip
    library: 5-7x faster than zlib at the same level and size, standard gzip that every reader
    opens) when it is installed, else by zlib. The file is written whole at ``path``."""
    import nibabel as nib

    path = str(path)
    if not path.endswith(".gz") or not isinstance(img, nib.Nifti1Image):
        nib.save(img, path)
        return
    raw = img.to_bytes()
    try:
        from isal import igzip_threaded
    except ImportError:  # no ISA-L wheel for this platform
        import gzip

        with open(path, "wb") as fh:
            fh.write(gzip.compress(raw, compresslevel=GZIP_LEVEL))
        return
    # blocks compressed on two threads (ISA-L releases the GIL), one gzip member stream
    with igzip_threaded.open(path, "wb", compresslevel=GZIP_LEVEL, threads=2) as fh:
        fh.write(raw)


class AtomicWriter:
    """Stage files under temporary names; rename them all into place on success.

    Used as a context manager: if the block raises, every staged file is removed, so a failed
    or killed scan never leaves a file a resumed run would trust::

        with AtomicWriter() as w:
            w.save_image(mask, meta, out / "x_desc-brain_mask.nii.gz", kind="mask")
            w.save_json({...}, out / "x_desc-brain_mask.json")
    """

    def __init__(self) -> None:
        self._staged: list[tuple[Path, Path]] = []

    def _tmp(self, final: Path) -> Path:
        final = Path(final)
        check_writable_dir(final.parent)
        name = final.name
        ext = next((e for e in (".nii.gz", ".nii", ".json", ".tsv") if name.endswith(e)), "")
        stem = name[: len(name) - len(ext)] if ext else name
        tmp = final.parent / f".{stem}.tmp{os.getpid()}{ext}"
        self._staged.append((tmp, final))
        return tmp

    def save_image(self, data: np.ndarray, meta: ImageMeta, final: str | os.PathLike,
                   kind: str = "image") -> Path:
        tmp = self._tmp(Path(final))
        try:
            write_nifti(make_image(data, meta, kind), tmp)
        except OSError as exc:
            raise OutputError(final, f"cannot write image ({exc.strerror or exc})") from None
        return Path(final)

    def save_nifti(self, img, final: str | os.PathLike) -> Path:
        """Stage an already built nibabel image (for grids that are not the input's)."""
        tmp = self._tmp(Path(final))
        try:
            write_nifti(img, tmp)
        except OSError as exc:
            raise OutputError(final, f"cannot write image ({exc.strerror or exc})") from None
        return Path(final)

    def save_json(self, obj: dict, final: str | os.PathLike) -> Path:
        import json

        tmp = self._tmp(Path(final))
        try:
            tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")
        except OSError as exc:
            raise OutputError(final, f"cannot write JSON ({exc.strerror or exc})") from None
        return Path(final)

    def save_text(self, text: str, final: str | os.PathLike) -> Path:
        tmp = self._tmp(Path(final))
        try:
            tmp.write_text(text)
        except OSError as exc:
            raise OutputError(final, f"cannot write file ({exc.strerror or exc})") from None
        return Path(final)

    def commit(self) -> list[Path]:
        done = []
        for tmp, final in self._staged:
            os.replace(tmp, final)
            done.append(final)
        self._staged.clear()
        return done

    def abort(self) -> None:
        for tmp, _ in self._staged:
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass
        self._staged.clear()

    def __enter__(self) -> "AtomicWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.commit()
        else:
            self.abort()
        return False


def _json_default(obj):
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")
