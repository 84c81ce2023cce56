// fedee dashboard: follow the aggregator's events and swap in the page's fresh <main>.
// Served from the binary (CSP: scripts from this origin only; no inline code).
"use strict";
(() => {
  const main = document.getElementById("main");
  const live = document.getElementById("live");
  if (!main || !live) return;
  const skew = (Number(document.body.dataset.nowMs) || Date.now()) - Date.now();
  let busy = false;
  let again = false;
  let last = null;

  function countdowns() {
    const now = Date.now() + skew;
    for (const el of document.querySelectorAll("[data-deadline-ms]")) {
      const left = Math.max(0, Math.round((Number(el.dataset.deadlineMs) - now) / 1000));
      el.textContent = left >= 60 ? `${Math.floor(left / 60)} min ${left % 60} s` : `${left} s`;
    }
  }

  async function refresh() {
    if (busy) {
      again = true;
      return;
    }
    busy = true;
    try {
      do {
        again = false;
        const event = last;
        const r = await fetch(`${location.pathname}?fragment=main`, {
          credentials: "same-origin",
          cache: "no-store",
        });
        if (!r.ok) {
          live.textContent = `error ${r.status}`;
          live.className = "live off";
          return;
        }
        main.innerHTML = await r.text();
        countdowns();
        if (event) {
          // What the browser test reads: the event shown and how long it took to show it.
          // Wall clocks: exact when browser and aggregator share a machine (the test).
          const latency = Date.now() - event.at_ms;
          document.body.dataset.eventSeq = String(event.seq);
          document.body.dataset.eventLatencyMs = String(latency);
          (window.fedeeLatencies = window.fedeeLatencies || []).push(latency);
        }
      } while (again);
    } catch (e) {
      live.textContent = "offline";
      live.className = "live off";
    } finally {
      busy = false;
    }
  }

  const source = new EventSource("/events");
  let lost = false;
  source.addEventListener("update", (e) => {
    last = JSON.parse(e.data);
    refresh();
  });
  source.onopen = () => {
    live.textContent = "live";
    live.className = "live on";
    if (lost) refresh(); // events missed while disconnected
    lost = false;
  };
  source.onerror = () => {
    lost = true;
    live.textContent = "reconnecting…";
    live.className = "live off";
  };
  countdowns();
  setInterval(countdowns, 1000);
})();
