"""volseg.io: every bad input gets one clear error naming the file; headers are validated."""

from __future__ import annotations

import gzip
import shutil

import nibabel as nib
import numpy as np
import pytest

from volseg.errors import InputError, OutputError
from volseg.io import AtomicWriter, ImageMeta, check_writable_dir, load_image, orientation_affine, scan_id


def _vol(shape=(20, 24, 22), seed=0):
    rng = np.random.default_rng(seed)
    data = rng.normal(100, 10, shape).astype(np.float32)
    data[5:15, 6:18, 5:17] += 200
    return data


def _save(path, data, affine=None, cls=nib.Nifti1Image):
    affine = orientation_affine("LPS", data.shape[:3], (1.0, 1.0, 1.0)) if affine is None else affine
    img = cls(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return path


@pytest.mark.parametrize("name,expected", [
    ("sub-01_ses-1_T1w.nii.gz", "sub-01_ses-1"),
    ("patient01_study1_T1W.nii.gz", "patient01_study1"),
    ("ch2.nii.gz", "ch2"),
    ("brain.mgz", "brain"),
    ("sub-02_FLAIR.nii", "sub-02"),
    ("T1_brain_c1.nii.gz", "T1_brain_c1"),
])
def test_scan_id(name, expected):
    assert scan_id(f"/some/dir/{name}") == expected


@pytest.mark.parametrize("ext,cls", [(".nii.gz", nib.Nifti1Image), (".nii", nib.Nifti2Image),
                                     (".mgz", nib.MGHImage)])
def test_reads_nifti1_nifti2_and_mgh(tmp_path, ext, cls):
    data = _vol()
    affine = orientation_affine("LIA", data.shape, (1.0, 1.5, 2.0))
    path = tmp_path / f"scan{ext}"
    if cls is nib.MGHImage:
        nib.save(nib.MGHImage(data, affine), str(path))
    else:
        _save(path, data, affine, cls)
    arr, meta = load_image(path)
    assert arr.shape == data.shape and arr.dtype == np.float32
    assert np.allclose(arr, data, atol=1e-3)
    assert np.allclose(meta.affine, affine, atol=1e-5)
    assert meta.axcodes == "LIA"
    assert np.allclose(meta.zooms, (1.0, 1.5, 2.0))


def test_4d_with_one_volume_is_accepted(tmp_path):
    data = _vol()[..., None]
    _, meta = load_image(_save(tmp_path / "one.nii.gz", data))
    assert meta.shape == data.shape[:3]


@pytest.mark.parametrize("problem,make,match", [
    ("missing", lambda p: p, "file not found"),
    ("empty file", lambda p: (p.write_bytes(b""), p)[1], "empty"),
    ("text", lambda p: (p.write_text("subject,age\n1,30\n"), p)[1], "not a readable NIfTI"),
    ("2d", lambda p: _save(p, np.arange(900, dtype=np.float32).reshape(30, 30), np.eye(4)), "2D"),
    ("2d slab", lambda p: _save(p, _vol((30, 30, 1))), "2D"),
    ("4d", lambda p: _save(p, np.stack([_vol(), _vol(seed=1)], -1)), "4D series with 2 volumes"),
    ("constant", lambda p: _save(p, np.full((10, 12, 14), 7.0, np.float32)), "constant"),
    ("zeros", lambda p: _save(p, np.zeros((10, 12, 14), np.float32)), "empty"),
    ("all nan", lambda p: _save(p, np.full((10, 12, 14), np.nan, np.float32)), "NaN"),
])
def test_bad_inputs_raise_input_error_naming_the_file(tmp_path, problem, make, match):
    path = make(tmp_path / "bad.nii.gz")
    with pytest.raises(InputError, match=match) as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_truncated_file(tmp_path):
    good = _save(tmp_path / "good.nii.gz", _vol((40, 40, 40)))
    raw = gzip.decompress(good.read_bytes())
    bad = tmp_path / "truncated.nii.gz"
    bad.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    with pytest.raises(InputError, match="truncated or corrupt") as info:
        load_image(bad)
    assert "truncated.nii.gz" in str(info.value)
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # a cut gzip stream
    with pytest.raises(InputError, match=str(cut)):
        load_image(cut)


def test_nan_and_inf_are_zeroed_with_a_warning(tmp_path, caplog):
    data = _vol()
    data[0, 0, :3] = [np.nan, np.inf, -np.inf]
    arr, meta = load_image(_save(tmp_path / "nan.nii.gz", data))
    assert np.isfinite(arr).all() and arr[0, 0, 0] == 0
    assert any("NaN/Inf" in w for w in meta.header_warnings)
    with pytest.raises(InputError, match="3 NaN/Inf voxels"):
        load_image(tmp_path / "nan.nii.gz", nonfinite="error")


def test_qform_sform_disagreement_is_repaired_with_the_sform(tmp_path):
    data = _vol()
    sform = orientation_affine("RAS", data.shape, (1.0, 1.0, 1.0))
    qform = orientation_affine("LPS", data.shape, (1.0, 1.0, 1.0))
    img = nib.Nifti1Image(data, sform)
    img.set_sform(sform, code=2)
    img.set_qform(qform, code=1)
    nib.save(img, str(tmp_path / "disagree.nii.gz"))
    _, meta = load_image(tmp_path / "disagree.nii.gz")
    assert np.allclose(meta.affine, sform)
    assert any("disagree" in w for w in meta.header_warnings)
    # outputs carry one consistent affine in both fields
    with AtomicWriter() as w:
        w.save_image(data > 150, meta, tmp_path / "mask.nii.gz", kind="mask")
    out = nib.load(tmp_path / "mask.nii.gz")
    assert np.allclose(out.header.get_qform(), sform, atol=1e-5)
    assert np.allclose(out.header.get_sform(), sform)
    assert int(out.header["sform_code"]) == 2


def test_qform_only_header(tmp_path):
    data = _vol()
    qform = orientation_affine("LPS", data.shape, (1.0, 1.0, 2.0))
    img = nib.Nifti1Image(data, None)
    img.set_qform(qform, code=1)
    img.set_sform(None, code=0)
    nib.save(img, str(tmp_path / "q.nii.gz"))
    _, meta = load_image(tmp_path / "q.nii.gz")
    assert np.allclose(meta.affine, qform, atol=1e-5)
    assert meta.sform_code == 1


def test_output_dtypes_and_geometry(tmp_path):
    data = _vol()
    affine = orientation_affine("PSR", data.shape, (0.8, 0.8, 4.0))
    _save(tmp_path / "in.nii.gz", data, affine)
    arr, meta = load_image(tmp_path / "in.nii.gz")
    with AtomicWriter() as w:
        w.save_image(arr > 150, meta, tmp_path / "m.nii.gz", kind="mask")
        w.save_image(arr.astype(np.float64), meta, tmp_path / "f.nii.gz", kind="map")
    m, f = nib.load(tmp_path / "m.nii.gz"), nib.load(tmp_path / "f.nii.gz")
    assert m.get_data_dtype() == np.uint8 and set(np.unique(m.get_fdata())) <= {0.0, 1.0}
    assert f.get_data_dtype() == np.float32
    for img in (m, f):
        assert img.shape == data.shape and np.allclose(img.affine, affine, atol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        with AtomicWriter() as w:
            w.save_image(np.zeros((3, 3, 3)), meta, tmp_path / "wrong.nii.gz", kind="mask")


def test_atomic_writer_leaves_nothing_on_failure(tmp_path):
    meta = ImageMeta(path="x", affine=np.eye(4), shape=(4, 4, 4), zooms=(1.0, 1.0, 1.0))
    with pytest.raises(RuntimeError):
        with AtomicWriter() as w:
            w.save_image(np.ones((4, 4, 4)), meta, tmp_path / "a.nii.gz", kind="mask")
            w.save_json({"a": 1}, tmp_path / "a.json")
            raise RuntimeError("killed half-way")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OutputError, match="file"):
        check_writable_dir(blocker)
    with pytest.raises(OutputError, match="cannot create output folder"):
        check_writable_dir(blocker / "sub")


def test_unwritable_folder_by_permission(tmp_path):
    import os

    if os.geteuid() == 0:
        pytest.skip("root writes everywhere; the permission case is covered by the path cases")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(OutputError, match="not writable"):
            check_writable_dir(ro)
    finally:
        ro.chmod(0o755)
        shutil.rmtree(ro)


def _save_raw(path, data, **fields):
    """A NIfTI-1 written byte for byte from a header with ``fields`` set, bypassing nibabel's
    save-time fixes (it would reset a zero pixdim to 1 and rebuild the sform/qform)."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(data.shape)
    hdr.set_data_dtype(np.float32)
    hdr["pixdim"][1:4] = 1.0
    hdr["qform_code"] = hdr["sform_code"] = 0
    for key, value in fields.items():
        if key == "pixdim":
            hdr["pixdim"][1:4] = value
        else:
            hdr[key] = value
    hdr["vox_offset"] = 352
    raw = hdr.binaryblock + b"\0" * 4 + np.asarray(data, np.float32).tobytes(order="F")
    (gzip.open if str(path).endswith(".gz") else open)(path, "wb").write(raw)
    return path


@pytest.mark.parametrize("name,fields,words", [
    ("zero pixdim", {"pixdim": (0.0, 0.0, 0.0)}, "pixdim[1..3] contains 0"),
    ("one zero pixdim", {"pixdim": (1.0, 0.0, 1.0), "qform_code": 1, "quatern_d": 1.0},
     "pixdim[1..3] contains 0"),
    ("negative pixdim", {"pixdim": (1.0, -1.0, 1.0)}, "pixdim[1..3] contains a negative"),
    ("nan pixdim", {"pixdim": (1.0, np.nan, 1.0)}, "pixdim[1..3] (1, nan, 1) is not finite"),
    ("zero sform", {"sform_code": 2}, "sform (srow_x/srow_y/srow_z) is zero, singular"),
    ("singular sform", {"sform_code": 1, "srow_x": (1, 0, 0, 0), "srow_y": (1, 0, 0, 0),
                        "srow_z": (0, 0, 1, 0)}, "sform (srow_x/srow_y/srow_z) is zero, singular"),
    ("nan qform", {"qform_code": 1, "quatern_b": np.nan}, "qform (quatern_b/c/d"),
])
def test_header_without_a_usable_geometry_is_refused(tmp_path, name, fields, words):
    path = _save_raw(tmp_path / f"{name.replace(' ', '_')}.nii.gz", _vol(), **fields)
    with pytest.raises(InputError) as info:
        load_image(path)
    msg = str(info.value)
    assert str(path) in msg and words in msg, msg


def test_raw_header_writer_makes_loadable_files(tmp_path):
    """The helper above writes valid files when the fields are valid (the refusals are real)."""
    data = _vol()
    arr, meta = load_image(_save_raw(tmp_path / "ok.nii.gz", data, pixdim=(1.0, 1.5, 2.0)))
    assert np.allclose(arr, data) and np.allclose(meta.zooms, (1.0, 1.5, 2.0))
    assert meta.qform_code == meta.sform_code == 0 and "neither qform nor sform" in meta.header_warnings[0]
    sform = orientation_affine("RAS", data.shape, (2.0, 2.0, 2.0))
    _, meta = load_image(_save_raw(tmp_path / "s.nii.gz", data, pixdim=(2.0, 2.0, 2.0), sform_code=1,
                                   srow_x=sform[0], srow_y=sform[1], srow_z=sform[2]))
    assert np.allclose(meta.affine, sform) and meta.sform_code == 1


@pytest.mark.parametrize("isal", [True, False])
def test_compressed_outputs_read_back_bit_identical(tmp_path, monkeypatch, isal):
    """Outputs are gzip-compressed by ISA-L (or zlib without it): standard gzip that nibabel and
    Python's gzip read, data and header bit for bit."""
    import gzip
    import sys

    import nibabel as nib

    from volseg.io.image import write_nifti

    if not isal:
        monkeypatch.setitem(sys.modules, "isal", None)  # import isal -> ImportError
    rng = np.random.default_rng(0)
    aff = np.diag([0.9, 1.1, 3.0, 1.0])
    aff[:3, 3] = [-90, 100, -50]
    for data in (rng.normal(100, 30, (61, 47, 23)).astype(np.float32),
                 (rng.random((61, 47, 23)) > 0.7).astype(np.uint8)):
        img = nib.Nifti1Image(data, aff)
        img.set_qform(aff, code=1)
        path = tmp_path / f"x_{data.dtype}.nii.gz"
        write_nifti(img, path)
        back = nib.load(str(path))
        assert np.array_equal(np.asarray(back.dataobj), data) and back.get_data_dtype() == data.dtype
        assert np.allclose(back.affine, aff)
        assert gzip.decompress(path.read_bytes()) == img.to_bytes()
