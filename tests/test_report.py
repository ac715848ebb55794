"""The QC report: nilearn pictures, report.html ordering, and the page in headless Chromium
(Debian's ``chromium``): it renders and every picture loads."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest

FAST_YAML = "preprocess:\n  n4:\n    shrink_target_mm: 8.0\n    iterations: [20, 20]\n"
IMG_CHECK = """<script>
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const bad = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute('src'));
  const d = document.createElement('pre');
  d.id = 'imgcheck';
  d.textContent = JSON.stringify({total: imgs.length, bad: bad,
                                  rows: document.querySelectorAll('#cohort tr').length});
  document.body.appendChild(d);
});
</script>"""


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("headless Chromium not installed (Debian: apt-get install chromium)")


def browser_check(report: Path) -> dict:
    """Load ``report`` in headless Chromium with a script that counts the pictures that loaded."""
    page = report.with_name(".report-check.html")  # same folder: same relative picture paths
    page.write_text(report.read_text().replace("</body>", IMG_CHECK + "</body>"))
    res = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu",
                          "--disable-dev-shm-usage", "--virtual-time-budget=10000", "--dump-dom",
                          page.as_uri()], capture_output=True, text=True, timeout=120)
    page.unlink()
    m = re.search(r'<pre id="imgcheck">([^<]*)</pre>', res.stdout)
    assert m, f"the page did not render or its script did not run:\n{res.stderr[-2000:]}"
    return json.loads(m.group(1).replace("&quot;", '"'))


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """``run_cohort`` (in-process) over two 4 mm synthetic heads and one broken file."""
    from volseg.cohort.run import RunOptions, run_cohort
    from volseg.synth import synth_head

    src = tmp_path_factory.mktemp("scans")
    for i, seed in enumerate((51, 52), start=1):
        subj = synth_head(seed, voxel_size=4.0)
        nib.save(nib.Nifti1Image(subj.image, subj.affine), str(src / f"sub-r{i}_T1w.nii.gz"))
    (src / "sub-broken_T1w.nii.gz").write_text("not an image")
    cfg = src.parent / "fast.yaml"
    cfg.write_text(FAST_YAML)
    out = tmp_path_factory.mktemp("out")
    res = run_cohort([src], out, opts=RunOptions(stages=("n4", "strip"), config=str(cfg), device="cpu"),
                     progress=False)
    assert len(res.done) == 2 and len(res.failed) == 1
    return out


def test_report_renders_in_chromium_with_every_picture(small_run):
    report = small_run / "report.html"
    html = report.read_text()
    assert html.index("sub-broken") < html.index("sub-r1")  # failed scans before the rest
    srcs = re.findall(r'<img src="([^"]+)"', html)
    assert len(srcs) == 2 and all((small_run / s).is_file() for s in srcs)
    got = browser_check(report)
    assert got == {"total": 2, "bad": [], "rows": 4}, got

    # the check can fail: a missing picture is reported
    png = small_run / srcs[0]
    keep = png.read_bytes()
    png.unlink()
    try:
        got = browser_check(report)
        assert got["bad"] == [srcs[0]], got
    finally:
        png.write_bytes(keep)


def test_report_screenshot_is_not_blank(small_run, tmp_path):
    import matplotlib.image as mpimg

    shot = tmp_path / "shot.png"
    subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    f"--screenshot={shot}", "--window-size=1000,1400", "--virtual-time-budget=10000",
                    (small_run / "report.html").as_uri()], capture_output=True, timeout=120, check=True)
    pixels = mpimg.imread(str(shot))
    assert pixels.shape[:2] == (1400, 1000)
    dark = (pixels[..., :3].mean(axis=2) < 0.2).mean()  # the pictures' black backgrounds
    assert 0.05 < dark < 0.9, f"{dark:.2f} of the page is dark"


def test_report_orders_flagged_then_failed_then_check():
    from volseg.report.html import render_report

    def rec(scan, status="ok", **m):
        return {"scan": scan, "status": status, "measures": m, "figures": {}, "outputs": {},
                "error": "boom", "stage": "load", "source": f"/x/{scan}.nii.gz"}

    html = render_report([rec("sub-a", qc="ok"), rec("sub-b", status="failed"),
                          rec("sub-c", qc="check", qc_notes=["brain volume 300 mL outside 700-2200 mL"]),
                          rec("sub-d", anomaly_flag=True, anomaly_score=0.4, qc="ok"),
                          rec("sub-e", anomaly_flag=True, anomaly_score=0.9, qc="ok")])
    table = html[html.index('<table id="cohort">'):html.index("</table>")]
    order = re.findall(r"<tr class=\"[a-z]*\"><td>(?:<a [^>]*>)?(sub-[a-e])", table)
    assert order == ["sub-e", "sub-d", "sub-b", "sub-c", "sub-a"]
    assert "brain volume 300 mL" in table and "boom" in table


def test_report_escapes_what_it_shows():
    """The page is a jinja2 template with autoescape on: a scan id, error or path holding HTML
    is shown as text, never run."""
    from volseg.report.html import render_report

    evil = "sub-<script>alert(1)</script>"
    recs = [{"scan": evil, "status": "ok", "source": "/x/<b>a</b>.nii.gz", "finished": "t",
             "measures": {"qc": "check", "qc_notes": ["<i>note</i>"]},
             "figures": {"mask": 'sub-x/figures/"><script>x.png'}, "outputs": {}},
            {"scan": "sub-bad", "status": "failed", "stage": "load", "error": "<img src=x onerror=alert(2)>"}]
    html = render_report(recs)
    assert "<script>" not in html and "<img src=x" not in html and "<b>" not in html and "<i>" not in html
    assert "sub-&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert 'id="sub-&lt;script&gt;alert(1)&lt;/script&gt;"' in html
    assert "&lt;img src=x onerror=alert(2)&gt;" in html and "&lt;i&gt;note&lt;/i&gt;" in html
    assert len(re.findall(r"<img ", html)) == 1  # the one picture; its src quoted and escaped
    assert html.count("<tr") == 3 and html.rstrip().endswith("</body></html>")


def test_report_template_is_shipped():
    """The template lives in the package and pyproject ships it (and depends on jinja2)."""
    import fnmatch
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    from volseg.report.html import TEMPLATE, TEMPLATE_DIR

    root = Path(__file__).resolve().parents[1]
    template = TEMPLATE_DIR / TEMPLATE
    assert template.is_file()
    meta = tomllib.loads((root / "pyproject.toml").read_text())
    rel = template.relative_to(root / "volseg").as_posix()
    assert any(fnmatch.fnmatch(rel, pat) for pat in meta["tool"]["setuptools"]["package-data"]["volseg"]), rel
    assert any(re.match(r"jinja2\b", dep, re.I) for dep in meta["project"]["dependencies"])
    assert "<table" not in (root / "volseg" / "report" / "html.py").read_text()  # markup in the template


def test_pictures_are_pngs_of_three_views(tmp_path):
    import matplotlib.image as mpimg

    from volseg.report.figures import anomaly_figure, mask_figure
    from volseg.synth import synth_head

    subj = synth_head(7, voxel_size=3.0, axcodes="LPS", oblique=True)
    aff = subj.affine
    anat = nib.Nifti1Image(subj.image, aff)
    brain = nib.Nifti1Image(subj.brain_mask, aff)
    amap = np.where(subj.brain_mask > 0, np.random.default_rng(0).random(subj.image.shape), 0).astype(np.float32)
    amask = np.zeros(subj.image.shape, np.uint8)
    c = np.argwhere(subj.brain_mask)[len(np.argwhere(subj.brain_mask)) // 2]
    amask[tuple(slice(v - 2, v + 3) for v in c)] = 1
    mask_figure(anat, brain, tmp_path / "m.png", title="m")
    anomaly_figure(anat, nib.Nifti1Image(amap, aff), brain, nib.Nifti1Image(amask, aff),
                   tmp_path / "a.png", title="a")
    for name in ("m.png", "a.png"):
        px = mpimg.imread(str(tmp_path / name))
        assert px.shape[1] > 2 * px.shape[0], "three views side by side"
        assert px[..., :3].std() > 0.05, f"{name} is blank"
    red = mpimg.imread(str(tmp_path / "m.png"))
    assert ((red[..., 0] > 0.8) & (red[..., 1] < 0.3) & (red[..., 2] < 0.3)).sum() > 50, "no red contour"


def test_anomaly_stage_wiring_with_a_stand_in_model(tmp_path, tiny_head):
    """The run's anomaly path (outputs, sidecars, measures, picture) against the stage's
    contract, with a stand-in for the model until volseg.anomaly lands (the real stage is
    tested with its module)."""
    from volseg.cohort.export import export_scan
    from volseg.cohort.inputs import scan_from_file
    from volseg.cohort.stages import Context, compute_scan
    from volseg.config import config_from_dict
    from volseg.strip.config import StripConfig
    from volseg.nets.folder import load_model

    def stand_in(native, mask, meta, model, cfg=None, n4=False):
        assert native.shape == mask.shape == tuple(meta.shape) and not n4
        time.sleep(0.05)  # a stage long enough to be timed
        amap = np.where(mask > 0, np.abs(native - native[mask > 0].mean()), 0).astype(np.float32)
        amask = (amap > np.percentile(amap[mask > 0], 95)).astype(np.uint8)
        return SimpleNamespace(map=amap, mask=amask, recon=native, score=0.7, flag=True,
                               timings={"net_s": 0.0}, info={"sha256": "0" * 64, "threshold": 0.5})

    cfg = config_from_dict({"preprocess": {"n4": {"shrink_target_mm": 8.0, "iterations": [10]}}},
                           StripConfig)
    net, info = load_model(None, kind="strip", device="cpu")
    ctx = Context(stages=("n4", "strip", "anomaly"), cfg=cfg, strip_net=net, anomaly_fn=stand_in,
                  anomaly_model=object(), models={"strip": {"sha256": info["sha256"]},
                                                  "anomaly": {"sha256": "0" * 64}})
    scan = scan_from_file(tiny_head[0])
    rec = export_scan(tmp_path, scan, compute_scan(scan.path, ctx), ctx)
    anat = tmp_path / "sub-tiny" / "anat"
    src = nib.load(str(tiny_head[0]))
    amap = nib.load(str(anat / "sub-tiny_desc-anomaly_map.nii.gz"))
    amask = nib.load(str(anat / "sub-tiny_label-anomaly_mask.nii.gz"))
    assert amap.shape == amask.shape == src.shape and np.allclose(amap.affine, src.affine)
    assert amask.get_data_dtype() == np.uint8
    side = json.loads((anat / "sub-tiny_desc-anomaly_map.json").read_text())
    assert side["AnomalyScore"] == 0.7 and side["AnomalyFlag"] is True and side["Anomaly"]["threshold"] == 0.5
    m = rec["measures"]
    vox_ml = 4.0 ** 3 / 1000
    assert m["anomaly_flag"] is True and m["anomalous_volume_ml"] == pytest.approx(
        np.asarray(amask.dataobj).sum() * vox_ml, abs=0.01)
    assert (tmp_path / rec["figures"]["anomaly"]).stat().st_size > 5000
    t = rec["timings"]
    assert 0.05 <= t["anomaly_s"] < t["total_s"]  # the stand-in's time, inside the scan's total
    assert t["total_s"] == pytest.approx(sum(v for k, v in t.items() if k != "total_s"), abs=0.01)


def test_plot_grid_keeps_world_positions_of_oblique_scans():
    """The pictures' one-shot nearest-neighbour grid: RAS, >= 2 mm, and a mask's centre stays
    where it is in the world (within a voxel of the picture grid) for an oblique LIA scan."""
    from scipy import ndimage as ndi

    from volseg.report.figures import PLOT_MM, plot_grid
    from volseg.synth import synth_head

    subj = synth_head(3, voxel_size=1.3, axcodes="LIA", oblique=True)
    aff = subj.affine
    anat = nib.Nifti1Image(subj.image.astype(np.float32), aff)
    brain = nib.Nifti1Image(subj.brain_mask.astype(np.uint8), aff)
    g = plot_grid(anat, brain=brain, amap=None)
    assert g["amap"] is None
    out_aff = g["anat"].affine
    assert np.allclose(out_aff[:3, :3], np.diag([PLOT_MM] * 3))
    assert g["brain"].get_data_dtype() == np.uint8 and g["anat"].shape == g["brain"].shape

    def centre(img):
        ijk = ndi.center_of_mass(np.asarray(img.dataobj) > 0)
        return (np.asarray(img.affine) @ np.r_[ijk, 1.0])[:3]

    assert np.linalg.norm(centre(g["brain"]) - centre(brain)) < PLOT_MM
    vol_in = subj.brain_mask.sum() * abs(np.linalg.det(aff[:3, :3]))
    vol_out = (np.asarray(g["brain"].dataobj) > 0).sum() * PLOT_MM**3
    assert abs(vol_out / vol_in - 1) < 0.05
    inside = np.asarray(g["anat"].dataobj)[np.asarray(g["brain"].dataobj) > 0]
    assert abs(inside.mean() / subj.image[subj.brain_mask > 0].mean() - 1) < 0.05
