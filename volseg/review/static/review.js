// Shared by the volseg review pages: the session token, JSON requests, small DOM helpers.
"use strict";
const volseg = (() => {
  const KEY = "volseg-review-token";
  const params = new URLSearchParams(location.search);
  if (params.get("token")) {
    localStorage.setItem(KEY, params.get("token"));
    params.delete("token");
    const rest = params.toString();
    history.replaceState(null, "", location.pathname + (rest ? "?" + rest : "") + location.hash);
  }
  const token = () => localStorage.getItem(KEY) || "";

  async function getJSON(url) {
    const r = await fetch(url, {cache: "no-store"});
    const body = await r.json().catch(() => ({}));
    if (!r.ok) throw new Error(body.error || `${r.status} ${r.statusText}`);
    return body;
  }

  async function postJSON(url, obj) {
    const r = await fetch(url, {method: "POST", cache: "no-store",
      headers: {"Content-Type": "application/json", "X-Volseg-Token": token()},
      body: JSON.stringify(obj)});
    const body = await r.json().catch(() => ({}));
    if (!r.ok) throw new Error(body.error || `${r.status} ${r.statusText}`);
    return body;
  }

  function el(tag, attrs = {}, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (v === undefined || v === null) continue;
      if (k === "class") e.className = v; else if (k === "text") e.textContent = v; else e.setAttribute(k, v);
    }
    for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    return e;
  }

  const na = (v) => (v === undefined || v === null || v === "" || v === "n/a");
  function num(v, digits) {
    if (na(v)) return "";
    const x = Number(v);
    return Number.isFinite(x) ? x.toFixed(digits) : String(v);
  }
  const typing = (e) => ["INPUT", "TEXTAREA", "SELECT"].includes(e.target.tagName) && e.target.type !== "radio"
    && e.target.type !== "checkbox" && e.target.type !== "range";

  return {token, getJSON, postJSON, el, na, num, typing};
})();
