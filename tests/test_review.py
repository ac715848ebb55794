"""``volseg review``: the ratings table, the local server (safety, API) and the pages in a real
headless Chromium (Debian's ``chromium`` + ``chromium-driver``, driven by Selenium): the cohort
table, the NiiVue viewer (a drawn canvas, a threshold slider that changes the overlay), the rating
form (a TSV row, shown again after a reload) and the printable report."""

from __future__ import annotations

import http.client
import io
import json
import multiprocessing as mp
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from volseg.review import ratings as R

FAST_YAML = "preprocess:\n  n4:\n    shrink_target_mm: 8.0\n    iterations: [20, 20]\n"


# -- the ratings table -------------------------------------------------------------------------
def test_make_rating_checks_every_field():
    ok = R.make_rating({"scan": "sub-01", "rater": " Ann ", "mask": "good", "anomaly": "no finding",
                        "comment": "fine\tedge\nok"}, scans={"sub-01"})
    assert ok["rater"] == "Ann" and ok["comment"] == "fine edge ok" and ok["time"].endswith("Z")
    bad = [({"scan": "sub-01", "rater": "A", "mask": "great"}, "'mask' must be one of"),
           ({"scan": "sub-01", "rater": "A", "anomaly": "lesion"}, "'anomaly' must be one of"),
           ({"scan": "sub-01", "mask": "good"}, "'rater' is required"),
           ({"scan": "sub-01", "rater": "A"}, "rate the mask, the anomaly map, or both"),
           ({"scan": "sub-99", "rater": "A", "mask": "good"}, "not in this run"),
           ({"scan": "../x", "rater": "A", "mask": "good"}, "'scan' must be"),
           ({"scan": "sub-01", "rater": "A", "mask": "good", "extra": 1}, "unknown field"),
           ({"scan": "sub-01", "rater": "A", "mask": "good", "comment": "x" * 3000}, "longer than"),
           ({"scan": "sub-01", "rater": 5, "mask": "good"}, "must be text"),
           ([1, 2], "JSON object")]
    for data, message in bad:
        with pytest.raises(R.RatingError, match=re.escape(message)):
            R.make_rating(data, scans={"sub-01"})


def test_ratings_round_trip_and_latest_per_rater(tmp_path):
    rows = [("sub-a", "ann", "reject", "", ""), ("sub-a", "bob", "good", "no finding", ""),
            ("sub-a", "ann", "good", "no finding", "fixed my mind"), ("sub-b", "ann", "good", "true finding", ""),
            ("sub-c", "ann", "fix", "no finding", ""), ("sub-d", "bob", "", "false alarm", "")]
    for scan, rater, mask, anomaly, comment in rows:
        R.append_rating(tmp_path, R.make_rating({"scan": scan, "rater": rater, "mask": mask, "anomaly": anomaly,
                                                 "comment": comment}))
    text = (tmp_path / R.RATINGS).read_text()
    assert text.splitlines()[0] == "\t".join(R.COLUMNS) and text.count("scan\trater") == 1
    got = R.read_ratings(tmp_path)
    assert [(r["scan"], r["rater"], r["mask"]) for r in got] == [(a, b, c) for a, b, c, _, _ in rows]
    assert "\tn/a\t" in text  # empty fields are BIDS' n/a, read back as ""
    assert R.healthy_controls(got) == ["sub-a"]  # ann's later rating replaced her reject
    assert R.good_masks(got) == ["sub-a", "sub-b"]
    assert R.rejected(got) == {}
    R.append_rating(tmp_path, R.make_rating({"scan": "sub-a", "rater": "bob", "mask": "reject", "anomaly": ""}))
    got = R.read_ratings(tmp_path)
    assert list(R.rejected(got)) == ["sub-a"] and R.healthy_controls(got) == []
    # a later rating of one field keeps the same rater's verdict on the other
    bob = next(r for r in R.latest(got)["sub-a"] if r["rater"] == "bob")
    assert (bob["mask"], bob["anomaly"]) == ("reject", "no finding")
    R.append_rating(tmp_path, R.make_rating({"scan": "sub-a", "rater": "bob", "mask": "good"}))
    assert R.healthy_controls(R.read_ratings(tmp_path)) == ["sub-a"]


def _append_many(args):
    out, k = args
    for i in range(40):
        R.append_rating(out, R.make_rating({"scan": f"sub-{k}", "rater": f"r{k}", "mask": "good",
                                            "comment": f"row {i} " + "x" * 500}))


def test_concurrent_appends_never_interleave(tmp_path):
    with mp.get_context("fork").Pool(4) as pool:
        pool.map(_append_many, [(str(tmp_path), k) for k in range(4)])
    lines = (tmp_path / R.RATINGS).read_text().splitlines()
    assert lines[0] == "\t".join(R.COLUMNS) and len(lines) == 1 + 160
    assert all(len(line.split("\t")) == len(R.COLUMNS) for line in lines)
    assert len(R.read_ratings(tmp_path)) == 160


# -- a small run to serve ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """``run_cohort`` over two 4 mm synthetic heads (all stages) and one broken file."""
    from volseg.cohort.run import RunOptions, run_cohort
    from volseg.synth import synth_head

    src = tmp_path_factory.mktemp("scans")
    for i, seed in enumerate((61, 62), start=1):
        subj = synth_head(seed, voxel_size=4.0)
        nib.save(nib.Nifti1Image(subj.image, subj.affine), str(src / f"sub-v{i}_T1w.nii.gz"))
    (src / "sub-broken_T1w.nii.gz").write_text("not an image")
    cfg = src.parent / "fast.yaml"
    cfg.write_text(FAST_YAML)
    out = tmp_path_factory.mktemp("out")
    res = run_cohort([src], out, opts=RunOptions(config=str(cfg), device="cpu"), progress=False)
    assert len(res.done) == 2 and len(res.failed) == 1
    return out


@pytest.fixture()
def served(run_dir):
    """The review server on a free port in a thread; the ratings file is removed afterwards."""
    from volseg.review.server import make_server

    server, app = make_server(run_dir, port=0)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield server, app
    server.shutdown()
    server.server_close()
    (run_dir / R.RATINGS).unlink(missing_ok=True)


def _req(server, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
    conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)  # the raw path, unnormalised
    hdrs = {"Host": f"127.0.0.1:{server.server_address[1]}", **(headers or {})}
    data = body.encode() if isinstance(body, str) else body
    if data is not None:
        hdrs.setdefault("Content-Length", str(len(data)))
    for k, v in hdrs.items():
        conn.putheader(k, v)
    conn.endheaders(data)
    r = conn.getresponse()
    payload = r.read()
    conn.close()
    return r.status, payload


def test_api_lists_every_scan_and_serves_its_files(served, run_dir):
    server, _app = served
    status, body = _req(server, "GET", "/api/scans")
    assert status == 200
    scans = json.loads(body)["scans"]
    assert sorted(s["scan"] for s in scans) == ["sub-broken", "sub-v1", "sub-v2"]
    assert all(s["rating_status"] == "unrated" for s in scans)
    # the self-QC columns of volseg_summary.tsv: the network's measures for finished scans
    done = [s for s in scans if s["status"] == "ok"]
    assert done and all(0 < float(s["qc_tta_dice"]) <= 1 and "qc_reasons" in s for s in done)
    status, body = _req(server, "GET", "/api/scans/sub-v1")
    detail = json.loads(body)
    assert status == 200 and set(detail["outputs"]) >= {"preproc", "mask", "anomaly_map"}
    assert detail["anomaly"]["voxel_threshold"] > 0 and len(detail["anomaly"]["peak_mm"]) == 3
    status, data = _req(server, "GET", detail["outputs"]["mask"])
    assert status == 200
    img = nib.Nifti1Image.from_bytes(__import__("gzip").decompress(data))
    on_disk = nib.load(str(run_dir / detail["outputs"]["mask"][len("/files/"):]))
    assert np.array_equal(np.asarray(img.dataobj), np.asarray(on_disk.dataobj))
    # the peak is the map's highest voxel, in world mm
    amap = nib.load(str(run_dir / detail["outputs"]["anomaly_map"][len("/files/"):]))
    a = np.asarray(amap.dataobj)
    ijk = np.unravel_index(np.argmax(a), a.shape)
    assert np.allclose(nib.affines.apply_affine(amap.affine, ijk), detail["anomaly"]["peak_mm"], atol=0.01)
    assert _req(server, "GET", "/api/scans/sub-nobody")[0] == 404
    assert _req(server, "GET", "/scan/sub-nobody")[0] == 404


def test_server_refuses_paths_outside_the_run(served, run_dir, tmp_path):
    server, _ = served
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours")
    link = run_dir / "link-out.txt"
    link.symlink_to(secret)
    try:
        for path in ("/files/../pyproject.toml", "/files/%2e%2e/%2e%2e/etc/passwd", "/files/sub-v1/../../x",
                     "/files//etc/passwd", "/files/.volseg/scans/sub-v1.json", "/files/link-out.txt",
                     "/static/../server.py", "/static/%2e%2e/server.py"):
            status, body = _req(server, "GET", path)
            assert status in (403, 404), (path, status)
            assert b"not yours" not in body and b"import" not in body
        assert _req(server, "GET", "/files/volseg_summary.tsv")[0] == 200
        # a foreign Host (DNS rebinding) is refused while bound to the loopback address
        assert _req(server, "GET", "/api/scans", headers={"Host": "evil.example"})[0] == 403
    finally:
        link.unlink()


def test_writes_need_the_token_and_malformed_ratings_write_nothing(served, run_dir):
    server, app = served
    good = json.dumps({"scan": "sub-v1", "rater": "ann", "mask": "good", "anomaly": "no finding"})
    js = {"Content-Type": "application/json"}
    assert _req(server, "POST", "/api/ratings", good, js)[0] == 403
    assert _req(server, "POST", "/api/ratings", good, {**js, "X-Volseg-Token": "wrong"})[0] == 403
    tok = {**js, "X-Volseg-Token": app.token}
    for body, status, message in [("{not json", 400, "not JSON"),
                                  (json.dumps({"scan": "sub-v1", "rater": "ann", "mask": "perfect"}), 400, "'mask'"),
                                  (json.dumps({"scan": "sub-zz", "rater": "ann", "mask": "good"}), 400, "not in this run"),
                                  (json.dumps({"scan": "sub-v1", "mask": "good"}), 400, "rater"),
                                  ("x" * 70000, 413, "at most")]:
        got, payload = _req(server, "POST", "/api/ratings", body, tok)
        assert got == status and message in json.loads(payload)["error"], (got, payload)
    assert _req(server, "POST", "/api/ratings", good, {"X-Volseg-Token": app.token, "Content-Type": "text/plain"})[0] == 415
    assert not (run_dir / R.RATINGS).exists()  # nothing was half-written
    status, payload = _req(server, "POST", "/api/ratings", good, tok)
    assert status == 201 and json.loads(payload)["rating"]["mask"] == "good"
    status, payload = _req(server, "GET", "/api/ratings?scan=sub-v1")
    assert [r["rater"] for r in json.loads(payload)["ratings"]] == ["ann"]
    assert R.read_ratings(run_dir)[0]["anomaly"] == "no finding"
    status, payload = _req(server, "GET", "/api/scans")
    assert {s["scan"]: s["rating_status"] for s in json.loads(payload)["scans"]}["sub-v1"] == "rated"


def test_printable_report_has_numbers_pictures_and_ratings(served, run_dir):
    server, _app = served
    R.append_rating(run_dir, R.make_rating({"scan": "sub-v2", "rater": "bob", "mask": "fix",
                                            "comment": "cuts the <b>cerebellum</b>"}))
    status, body = _req(server, "GET", "/scan/sub-v2/report")
    html = body.decode()
    assert status == 200 and "brain volume" in html and "anomaly score" in html
    assert "cuts the &lt;b&gt;cerebellum&lt;/b&gt;" in html  # escaped
    imgs = re.findall(r'<img src="([^"]+)"', html)
    assert len(imgs) == 2 and all(_req(server, "GET", u)[0] == 200 for u in imgs)
    assert "@media print" in _req(server, "GET", "/static/review.css")[1].decode()


# -- in a real browser -------------------------------------------------------------------------
def _browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium not installed (pip install selenium)")
    chrome = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    driver = shutil.which("chromedriver")
    if not chrome or not driver:
        pytest.skip("headless Chromium and chromedriver not installed (Debian: apt-get install chromium chromium-driver)")
    o = webdriver.ChromeOptions()
    o.binary_location = chrome
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--use-angle=swiftshader",
              "--enable-unsafe-swiftshader", "--window-size=1400,1000"):
        o.add_argument(a)
    o.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=o)


@pytest.fixture()
def browser():
    d = _browser()
    yield d
    d.quit()


def _wait(d, cond, timeout=60, what="the page"):
    t0 = time.time()
    while time.time() - t0 < timeout:
        got = cond()
        if got:
            return got
        time.sleep(0.2)
    logs = "\n".join(str(x) for x in d.get_log("browser"))
    raise AssertionError(f"{what} did not get ready in {timeout} s; browser log:\n{logs}")


def _ready(d):
    return d.find_element("tag name", "body").get_attribute("data-ready")


def _canvas(d) -> np.ndarray:
    import matplotlib.image as mpimg

    time.sleep(0.5)  # a frame after the last change
    png = d.find_element("id", "gl").screenshot_as_png
    return mpimg.imread(io.BytesIO(png))[..., :3]


def test_cohort_page_lists_sorts_and_filters(served, browser):
    server, app = served
    base = f"http://127.0.0.1:{server.server_address[1]}"
    browser.get(f"{base}/?token={app.token}")
    assert _wait(browser, lambda: _ready(browser), what="the cohort page") == "1"
    assert "token" not in browser.current_url  # taken out of the address bar
    rows = lambda: [r.get_attribute("data-scan") for r in browser.find_elements("css selector", "#cohort tbody tr")]
    assert sorted(rows()) == ["sub-broken", "sub-v1", "sub-v2"]
    browser.find_element("id", "f-failed").click()
    assert rows() == ["sub-broken"]
    browser.find_element("id", "f-failed").click()
    head = browser.find_element("css selector", '#cohort th[data-key="anomaly_score"]')
    head.click()
    scores = {s["scan"]: float(s["anomaly_score"]) for s in app.scans()["scans"] if s["status"] == "ok"}
    assert rows() == sorted(scores, key=scores.get) + ["sub-broken"]  # missing values last
    head.click()
    assert rows() == sorted(scores, key=scores.get, reverse=True) + ["sub-broken"]


def test_scan_page_draws_the_viewer_and_the_slider_changes_the_overlay(served, browser):
    server, app = served
    base = f"http://127.0.0.1:{server.server_address[1]}"
    browser.get(f"{base}/scan/sub-v1?token={app.token}")
    assert _wait(browser, lambda: _ready(browser), what="the viewer") == "1", browser.find_element("id", "error").text
    assert browser.execute_script("return window.volsegViewer.volumes.length") == 3
    before = _canvas(browser)
    assert before.std() > 0.05 and (before.mean(axis=2) > 0.2).mean() > 0.05  # a drawn brain, not a blank canvas
    browser.execute_script("const s = document.getElementById('map-threshold'); s.value = 0;"
                           "s.dispatchEvent(new Event('input'));")
    low = _canvas(browser)
    changed = (np.abs(low - before).sum(axis=2) > 0.1).mean()
    assert changed > 0.01, f"only {changed:.4f} of the canvas changed when the threshold went to 0"
    assert float(browser.execute_script("return window.volsegViewer.volumes[2].cal_min")) == 0.0
    loc = browser.find_element("id", "location").text
    assert "mm" in loc  # the crosshair's coordinates (the map's peak)


def test_rating_form_saves_a_row_and_a_reload_shows_it(served, browser, run_dir):
    server, app = served
    base = f"http://127.0.0.1:{server.server_address[1]}"
    browser.get(f"{base}/scan/sub-v2?token={app.token}")
    _wait(browser, lambda: _ready(browser), what="the scan page")
    browser.find_element("css selector", '#rating input[name="mask"][value="fix"]').click()
    browser.find_element("css selector", '#rating input[name="anomaly"][value="false alarm"]').click()
    browser.find_element("id", "comment").send_keys("frontal edge too wide")
    browser.find_element("id", "rater").send_keys("ann")
    browser.find_element("id", "save").click()
    _wait(browser, lambda: browser.find_element("id", "rating-status").text, 20, "the save")
    assert browser.find_element("id", "rating-status").text.startswith("saved"), \
        browser.find_element("id", "rating-status").text
    rows = R.read_ratings(run_dir)
    assert [(r["scan"], r["rater"], r["mask"], r["anomaly"], r["comment"]) for r in rows] == [
        ("sub-v2", "ann", "fix", "false alarm", "frontal edge too wide")]
    browser.refresh()
    _wait(browser, lambda: _ready(browser), what="the reloaded page")
    assert browser.find_element("css selector", '#rating input[name="mask"][value="fix"]').is_selected()
    assert browser.find_element("css selector", '#rating input[name="anomaly"][value="false alarm"]').is_selected()
    assert browser.find_element("id", "comment").get_attribute("value") == "frontal edge too wide"
    assert "ann" in browser.find_element("id", "ratings").text
    # keyboard: g (good), n (no finding), s (save), then j goes to the next scan
    body = browser.find_element("tag name", "body")
    browser.execute_script("document.activeElement.blur()")
    body.send_keys("gns")
    _wait(browser, lambda: len(R.read_ratings(run_dir)) == 2, 20, "the keyboard save")
    last = R.read_ratings(run_dir)[-1]
    assert (last["mask"], last["anomaly"], last["rater"]) == ("good", "no finding", "ann")
    body.send_keys("k")
    _wait(browser, lambda: browser.current_url.endswith("/scan/sub-v1"), 20, "the previous scan")


def test_a_missing_token_is_refused_in_the_page(served, browser, run_dir):
    server, _app = served
    base = f"http://127.0.0.1:{server.server_address[1]}"
    browser.get(f"{base}/scan/sub-v1")
    browser.execute_script("localStorage.clear()")
    browser.refresh()
    _wait(browser, lambda: _ready(browser))
    browser.find_element("css selector", '#rating input[name="mask"][value="good"]').click()
    browser.find_element("id", "rater").send_keys("eve")
    browser.find_element("id", "save").click()
    _wait(browser, lambda: "not saved" in browser.find_element("id", "rating-status").text, 20, "the refusal")
    assert "token" in browser.find_element("id", "rating-status").text
    assert not (run_dir / R.RATINGS).exists()


# -- the installed command ---------------------------------------------------------------------
def _volseg() -> list[str]:
    exe = Path(sys.executable).with_name("volseg")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "volseg"]


def test_cli_serves_until_stopped_by_its_pid(run_dir):
    proc = subprocess.Popen(_volseg() + ["review", str(run_dir), "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = proc.stdout.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)/\?token=(\S+)", line)
        assert m, line + proc.stderr.read()
        port, token = int(m.group(1)), m.group(2)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
        conn.request("GET", "/api/scans")
        r = conn.getresponse()
        assert r.status == 200 and len(json.loads(r.read())["scans"]) == 3
        conn.request("POST", "/api/ratings", json.dumps({"scan": "sub-v1", "rater": "cli", "mask": "good"}),
                     {"Content-Type": "application/json", "X-Volseg-Token": token})
        r = conn.getresponse()
        assert r.status == 201, r.read()
        conn.close()
    finally:
        os.kill(proc.pid, signal.SIGINT)
        proc.wait(timeout=20)
        (run_dir / R.RATINGS).unlink(missing_ok=True)
    assert proc.returncode == 0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_cli_stops_cleanly_when_started_with_sigint_ignored(run_dir, sig):
    """A script that starts `volseg review &` in a non-interactive shell hands it SIGINT ignored;
    Ctrl+C / kill -INT and kill (SIGTERM) must still stop it, with exit code 0."""
    proc = subprocess.Popen(_volseg() + ["review", str(run_dir), "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        assert "http://" in proc.stdout.readline()
        os.kill(proc.pid, sig)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_warns_when_bound_beyond_this_machine_and_refuses_a_folder_without_a_run(tmp_path, run_dir):
    proc = subprocess.Popen(_volseg() + ["review", str(run_dir), "--port", "0", "--host", "0.0.0.0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert "http://" in proc.stdout.readline()
    finally:
        os.kill(proc.pid, signal.SIGINT)
        proc.wait(timeout=20)
    assert "other machines" in proc.stderr.read()
    res = subprocess.run(_volseg() + ["review", str(tmp_path), "--port", "0"], capture_output=True, text=True,
                         timeout=60, check=False)
    assert res.returncode != 0 and "volseg_summary.tsv" in res.stderr and str(tmp_path) in res.stderr


def test_a_run_without_the_anomaly_stage_shows_image_and_mask_only(tmp_path, browser):
    from volseg.cohort.run import RunOptions, run_cohort
    from volseg.review.server import make_server
    from volseg.synth import synth_head

    src = tmp_path / "scans"
    src.mkdir()
    subj = synth_head(63, voxel_size=4.0)
    nib.save(nib.Nifti1Image(subj.image, subj.affine), str(src / "sub-m1_T1w.nii.gz"))
    cfg = tmp_path / "fast.yaml"
    cfg.write_text(FAST_YAML)
    out = tmp_path / "out"
    run_cohort([src], out, opts=RunOptions(stages=("n4", "strip"), config=str(cfg), device="cpu",
                                           figures=False), progress=False)
    server, app = make_server(out, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        detail = app.scan("sub-m1")
        assert set(detail["outputs"]) == {"preproc", "mask", "brain"} and detail["figures"] == {}
        browser.get(f"http://127.0.0.1:{server.server_address[1]}/scan/sub-m1?token={app.token}")
        assert _wait(browser, lambda: _ready(browser)) == "1", browser.find_element("id", "error").text
        assert browser.execute_script("return window.volsegViewer.volumes.length") == 2
        assert not browser.find_element("id", "map-controls").is_displayed()
        status, body = _req(server, "GET", "/scan/sub-m1/report")
        assert status == 200 and b"No pictures" in body
    finally:
        server.shutdown()
        server.server_close()
