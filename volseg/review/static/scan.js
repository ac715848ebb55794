// One scan in volseg review: NiiVue with the image, brain mask and anomaly map, the numbers, and
// the rating form (keyboard shortcuts). window.volsegViewer is the NiiVue instance.
"use strict";
(async () => {
  const {getJSON, postJSON, el, na, num, typing} = volseg;
  const $ = (id) => document.getElementById(id);
  const name = decodeURIComponent(location.pathname.replace(/^\/scan\//, ""));
  const RATER_KEY = "volseg-review-rater", ADVANCE_KEY = "volseg-review-advance";
  let detail, nv, maskLayer = -1, mapLayer = -1;
  const views = ["multiplanar", "axial", "coronal", "sagittal", "render"];

  function fail(e) {
    $("error").textContent = String(e && e.message ? e.message : e);
    document.body.dataset.ready = "error";
  }

  function showNumbers(d) {
    const s = d.summary;
    const rows = [["status", s.status], ["QC", s.qc], ["QC reasons", s.qc_notes],
      ["brain volume (mL)", num(s.brain_volume_ml, 1)], ["SNR", num(s.snr, 1)],
      ["anomaly score", num(s.anomaly_score, 4)],
      ["scan threshold", d.anomaly.scan_threshold == null ? "" : num(d.anomaly.scan_threshold, 4)],
      ["flagged", s.anomaly_flag === "true" ? "yes" : (s.anomaly_flag === "false" ? "no" : "")],
      ["anomalous volume (mL)", num(s.anomalous_volume_ml, 2)],
      ["voxel threshold", d.anomaly.voxel_threshold == null ? "" : num(d.anomaly.voxel_threshold, 4)],
      ["processing time (s)", num(s.time_total_s, 1)]];
    $("numbers").replaceChildren(...rows.filter(([, v]) => !na(v)).map(([k, v]) =>
      el("tr", {class: k === "QC reasons" ? "reasons" : ""}, el("th", {text: k}), el("td", {text: v}))));
  }

  function showRatings(list) {
    if (!list.length) { $("ratings").replaceChildren(el("tr", {}, el("td", {text: "not rated yet"}))); return; }
    $("ratings").replaceChildren(
      el("tr", {}, ...["time (UTC)", "rater", "mask", "anomaly", "comment"].map((h) => el("th", {text: h}))),
      ...list.slice().reverse().map((r) => el("tr", {},
        el("td", {text: r.time}), el("td", {text: r.rater}), el("td", {text: r.mask || "-"}),
        el("td", {text: r.anomaly || "-"}), el("td", {text: r.comment}))));
  }

  function fillForm(list) {
    const rater = $("rater").value.trim();
    const mine = list.filter((r) => r.rater === rater);
    const last = mine[mine.length - 1];
    if (!last) return;  // nothing saved by this rater: keep what is in the form
    document.querySelectorAll('#rating input[type="radio"]').forEach((i) => { i.checked = false; });
    for (const f of ["mask", "anomaly"]) {
      const i = document.querySelector(`#rating input[name="${f}"][value="${last[f]}"]`);
      if (i) i.checked = true;
    }
    $("comment").value = last.comment || "";
  }

  function choose(field, value) {
    const i = document.querySelector(`#rating input[name="${field}"][value="${value}"]`);
    if (i) i.checked = true;
  }

  async function save(ev) {
    if (ev) ev.preventDefault();
    const rater = $("rater").value.trim();
    const pick = (f) => (document.querySelector(`#rating input[name="${f}"]:checked`) || {}).value || "";
    const status = $("rating-status");
    if (!rater) { status.textContent = "give your name or initials as rater"; status.className = "status error"; $("rater").focus(); return; }
    localStorage.setItem(RATER_KEY, rater);
    try {
      const res = await postJSON("/api/ratings", {scan: name, rater, mask: pick("mask"), anomaly: pick("anomaly"),
                                                  comment: $("comment").value});
      status.textContent = `saved ${res.rating.time}`;
      status.className = "status ok";
      detail.ratings.push(res.rating);
      showRatings(detail.ratings);
      if ($("advance").checked && detail.next) location.href = `/scan/${encodeURIComponent(detail.next)}`;
    } catch (e) {
      status.textContent = `not saved: ${e.message}`;
      status.className = "status error";
    }
  }

  function setView(v) {
    const t = {multiplanar: nv.sliceTypeMultiplanar, axial: nv.sliceTypeAxial, coronal: nv.sliceTypeCoronal,
               sagittal: nv.sliceTypeSagittal, render: nv.sliceTypeRender}[v];
    $("view").value = v;
    nv.setSliceType(t);
  }

  function setThreshold(v) {
    if (mapLayer < 0) return;
    const vol = nv.volumes[mapLayer];
    vol.cal_min = Number(v);
    if (vol.cal_max <= vol.cal_min) vol.cal_max = vol.cal_min * 1.5 + 1e-3;
    $("map-threshold-value").textContent = Number(v).toFixed(3);
    nv.updateGLVolume();
  }

  function goToPeak() {
    const peak = detail.anomaly.peak_mm;
    if (!peak || !nv) return;
    nv.scene.crosshairPos = nv.mm2frac(peak);
    nv.drawScene();
    nv.createOnLocationChange();
  }

  function bindControls() {
    $("peak").addEventListener("click", goToPeak);
    $("controls").addEventListener("submit", (e) => e.preventDefault());
    $("view").addEventListener("input", () => setView($("view").value));
    $("mask-opacity").addEventListener("input", () => maskLayer >= 0 && nv.setOpacity(maskLayer, Number($("mask-opacity").value)));
    $("mask-colormap").addEventListener("input", () => maskLayer >= 0 && nv.setColormap(nv.volumes[maskLayer].id, $("mask-colormap").value));
    $("map-opacity").addEventListener("input", () => mapLayer >= 0 && nv.setOpacity(mapLayer, Number($("map-opacity").value)));
    $("map-threshold").addEventListener("input", () => setThreshold($("map-threshold").value));
    $("map-colormap").addEventListener("input", () => mapLayer >= 0 && nv.setColormap(nv.volumes[mapLayer].id, $("map-colormap").value));
    $("rating").addEventListener("submit", save);
    $("rater").addEventListener("change", () => { localStorage.setItem(RATER_KEY, $("rater").value.trim()); fillForm(detail.ratings); });
    $("advance").addEventListener("change", () => localStorage.setItem(ADVANCE_KEY, $("advance").checked ? "1" : ""));
    let overlaysOn = true;
    document.addEventListener("keydown", (e) => {
      if (typing(e) || e.ctrlKey || e.metaKey || e.altKey) return;
      const k = e.key;
      const act = {g: () => choose("mask", "good"), f: () => choose("mask", "fix"), x: () => choose("mask", "reject"),
        t: () => choose("anomaly", "true finding"), a: () => choose("anomaly", "false alarm"),
        m: () => choose("anomaly", "missed finding"), n: () => choose("anomaly", "no finding"),
        s: () => save(), c: () => $("comment").focus(),
        j: () => detail.next && (location.href = `/scan/${encodeURIComponent(detail.next)}`),
        k: () => detail.previous && (location.href = `/scan/${encodeURIComponent(detail.previous)}`),
        p: () => goToPeak(),
        v: () => setView(views[(views.indexOf($("view").value) + 1) % views.length]),
        o: () => {
          overlaysOn = !overlaysOn;
          if (maskLayer >= 0) nv.setOpacity(maskLayer, overlaysOn ? Number($("mask-opacity").value) : 0);
          if (mapLayer >= 0) nv.setOpacity(mapLayer, overlaysOn ? Number($("map-opacity").value) : 0);
        }}[k];
      if (act) { e.preventDefault(); act(); }
    });
  }

  try {
    detail = await getJSON(`/api/scans/${encodeURIComponent(name)}`);
  } catch (e) { fail(e); return; }
  document.title = `${name} · volseg review`;
  $("title").textContent = name;
  $("source").textContent = `input: ${detail.source}`;
  for (const [id, target] of [["prev", detail.previous], ["next", detail.next]]) {
    if (target) $(id).href = `/scan/${encodeURIComponent(target)}`; else $(id).removeAttribute("href");
  }
  $("report").href = `/scan/${encodeURIComponent(name)}/report`;
  showNumbers(detail);
  showRatings(detail.ratings);
  $("rater").value = localStorage.getItem(RATER_KEY) || "";
  $("advance").checked = localStorage.getItem(ADVANCE_KEY) === "1";
  fillForm(detail.ratings);

  const out = detail.outputs;
  const base = out.preproc || out.brain;
  if (!base) { fail(detail.summary.status === "ok" ? "this scan has no image to show" : "this scan failed: nothing to show"); return; }
  const file = (u) => u.split("/").pop();
  const vols = [{url: base, name: file(base), colormap: "gray"}];
  if (out.mask) { maskLayer = vols.length; vols.push({url: out.mask, name: file(out.mask), colormap: "red", opacity: 0.35, cal_min: 0.5, cal_max: 1}); }
  if (out.anomaly_map) { mapLayer = vols.length; vols.push({url: out.anomaly_map, name: file(out.anomaly_map), colormap: "hot", opacity: 0.8}); }
  if (maskLayer < 0) $("mask-controls").hidden = true;
  if (mapLayer < 0) $("map-controls").hidden = true;
  bindControls();
  try {
    nv = new niivue.Niivue({backColor: [0, 0, 0, 1], show3Dcrosshair: true, isColorbar: mapLayer >= 0,
                            dragAndDropEnabled: false, viewModeHotKey: "Unused", clipPlaneHotKey: "Unused",
                            cycleClipPlaneHotKey: "Unused", logLevel: "warn"});
    window.volsegViewer = nv;
    await nv.attachTo("gl");
    nv.onLocationChange = (d) => {
      const mm = Array.from(d.mm).slice(0, 3).map((x) => x.toFixed(1)).join(", ");
      const vals = d.values.map((v, i) => `${["image", "mask", "map"][i === maskLayer ? 1 : (i === mapLayer ? 2 : 0)]} ${Number(v.value).toPrecision(3)}`);
      $("location").textContent = `${mm} mm (RAS) · ${vals.join(" · ")}`;
    };
    await nv.loadVolumes(vols);
    setView("multiplanar");
    if (mapLayer >= 0) {
      const vol = nv.volumes[mapLayer];
      const thr = detail.anomaly.voxel_threshold;
      const top = Math.max(vol.robust_max || 0, vol.global_max || 0, thr ? thr * 2 : 0, 1e-3);
      $("map-threshold").max = String(top);
      $("map-threshold").step = String(top / 400);
      vol.cal_max = Math.max(vol.robust_max || top, (thr || 0) * 1.5, 1e-3);
      const start = thr != null ? thr : (vol.robust_max || top) * 0.5;
      $("map-threshold").value = String(start);
      if (thr != null) $("map-calibrated").textContent = `calibrated voxel threshold ${Number(thr).toFixed(3)}`;
      setThreshold(start);
      if (detail.anomaly.peak_mm) goToPeak();
    }
    document.body.dataset.ready = "1";
  } catch (e) { fail(e); }
})();
