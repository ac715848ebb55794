// The cohort table of volseg review: sortable, filterable by flag, QC check, failures, rating.
"use strict";
(() => {
  const {getJSON, el, na, num} = volseg;
  let rows = [], sortKey = null, sortDir = 1;
  const $ = (id) => document.getElementById(id);

  function cmp(a, b, key, numeric) {
    const x = a[key], y = b[key];
    if (na(x) && na(y)) return 0;
    if (na(x)) return 1;            // missing values last
    if (na(y)) return -1;
    if (numeric) return (Number(x) - Number(y)) * sortDir;
    return String(x).localeCompare(String(y)) * sortDir;
  }

  function keep(r) {
    const text = $("f-text").value.trim().toLowerCase();
    if (text && !r.scan.toLowerCase().includes(text)) return false;
    const flag = $("f-flag").value;
    if (flag === "flagged" && r.anomaly_flag !== "true") return false;
    if (flag === "normal" && r.anomaly_flag !== "false") return false;
    if ($("f-check").checked && r.qc !== "check") return false;
    if ($("f-failed").checked && r.status === "ok") return false;
    const rating = $("f-rating").value;
    if (rating && r.rating_status !== rating) return false;
    return true;
  }

  function render() {
    const th = document.querySelector(`#cohort th[data-key="${sortKey}"]`);
    let list = rows.filter(keep);
    if (sortKey) list = list.slice().sort((a, b) => cmp(a, b, sortKey, th && th.dataset.num));
    const body = document.querySelector("#cohort tbody");
    body.replaceChildren(...list.map((r) => {
      const cls = r.status !== "ok" ? "failed" : (r.anomaly_flag === "true" ? "flag" : (r.qc === "check" ? "check" : ""));
      const raters = r.ratings.map((x) => x.rater).join(", ");
      return el("tr", {class: cls, "data-scan": r.scan},
        el("td", {}, el("a", {href: `/scan/${encodeURIComponent(r.scan)}`}, r.scan)),
        el("td", {text: r.status}), el("td", {text: na(r.qc) ? "" : r.qc}),
        el("td", {text: num(r.brain_volume_ml, 1)}), el("td", {text: num(r.snr, 1)}),
        el("td", {text: num(r.anomaly_score, 3)}),
        el("td", {text: r.anomaly_flag === "true" ? "yes" : (r.anomaly_flag === "false" ? "no" : "")}),
        el("td", {text: num(r.anomalous_volume_ml, 2)}),
        el("td", {class: "rating " + r.rating_status, title: raters}, r.rating_status + (raters ? ` (${raters})` : "")),
        el("td", {text: na(r.qc_notes) ? "" : r.qc_notes}));
    }));
    $("shown").textContent = `${list.length} of ${rows.length} shown`;
    document.querySelectorAll("#cohort th").forEach((h) => {
      h.classList.toggle("sorted", h.dataset.key === sortKey);
      h.classList.toggle("desc", h.dataset.key === sortKey && sortDir < 0);
    });
  }

  document.querySelectorAll("#cohort th").forEach((h) => h.addEventListener("click", () => {
    sortDir = sortKey === h.dataset.key ? -sortDir : 1;
    sortKey = h.dataset.key;
    render();
  }));
  $("filters").addEventListener("submit", (e) => e.preventDefault());
  ["f-text", "f-flag", "f-check", "f-failed", "f-rating"].forEach((id) => $(id).addEventListener("input", render));

  getJSON("/api/scans").then((data) => {
    rows = data.scans;
    $("folder").textContent = data.folder;
    document.title = `volseg review: ${data.folder}`;
    const failed = rows.filter((r) => r.status !== "ok").length;
    const flagged = rows.filter((r) => r.anomaly_flag === "true").length;
    const unrated = rows.filter((r) => r.rating_status === "unrated").length;
    $("counts").textContent = `${rows.length} scans, ${failed} failed, ${flagged} flagged, ${unrated} not rated yet`;
    render();
    document.body.dataset.ready = "1";
  }).catch((e) => { $("error").textContent = String(e); document.body.dataset.ready = "error"; });
})();
