/* fewshot-bench leaderboard site: sortable columns and the setting filter. Plain JS, no
   libraries, works from file:// (a classic script, not a module). */
(function () {
  "use strict";

  function sortKey(cell, numeric) {
    var v = cell.getAttribute("data-sort");
    if (v === null) v = cell.textContent.trim();
    if (numeric) {
      if (v === "") return null;
      var x = parseFloat(v);
      return isNaN(x) ? null : x;
    }
    return v.toLowerCase();
  }

  function sortBy(table, index, th) {
    var numeric = th.getAttribute("data-type") === "num";
    var dir = th.getAttribute("aria-sort") === "ascending" ? "descending" : "ascending";
    var heads = table.tHead.rows[0].cells;
    for (var h = 0; h < heads.length; h++) heads[h].removeAttribute("aria-sort");
    th.setAttribute("aria-sort", dir);
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var pos = new Map();
    rows.forEach(function (r, k) { pos.set(r, k); });
    rows.sort(function (a, b) {
      var x = sortKey(a.cells[index], numeric);
      var y = sortKey(b.cells[index], numeric);
      var c;
      if (x === null || y === null) {
        c = x === null && y === null ? 0 : x === null ? 1 : -1; /* blanks last */
        return c || pos.get(a) - pos.get(b);
      }
      c = numeric ? x - y : x.localeCompare(y);
      if (dir === "descending") c = -c;
      return c || pos.get(a) - pos.get(b);
    });
    rows.forEach(function (r) { body.appendChild(r); });
  }

  function applyFilter() {
    var select = document.getElementById("setting-filter");
    var wanted = select ? select.value : "";
    var shown = 0, total = 0;
    document.querySelectorAll("table.board tbody tr").forEach(function (tr) {
      var settings = (tr.getAttribute("data-setting") || "").split(", ");
      var keep = wanted === "" || settings.indexOf(wanted) >= 0;
      tr.hidden = !keep;
      total += 1;
      if (keep) shown += 1;
    });
    var count = document.getElementById("shown-count");
    if (count) count.textContent = shown + " of " + total + " entries shown";
  }

  document.querySelectorAll("table.sortable").forEach(function (table) {
    var heads = table.tHead.rows[0].cells;
    Array.prototype.forEach.call(heads, function (th, i) {
      if (!th.classList.contains("sort")) return;
      th.tabIndex = 0;
      th.title = "sort by this column (click again to reverse)";
      th.addEventListener("click", function () { sortBy(table, i, th); });
      th.addEventListener("keydown", function (e) {
        if (e.key === "Enter" || e.key === " ") { e.preventDefault(); sortBy(table, i, th); }
      });
    });
  });
  var select = document.getElementById("setting-filter");
  if (select) select.addEventListener("change", applyFilter);
  applyFilter();
})();
