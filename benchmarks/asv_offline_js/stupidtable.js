/* A small stand-in for the stupidtable jQuery plugin (1.0.1), which asv 0.6's dashboard
 * loads from a CDN and no Debian or PyPI package ships. It implements what asv uses:
 * $(table).stupidtable(sortFns) makes the <th data-sort="TYPE"> headers sort the rows on
 * click, $(th).stupidsort(dir) sorts by that column ("asc" or "desc"), and the table
 * triggers "aftertablesort" with {column, direction}. Types: "string", "int", "float" and
 * those given in sortFns (a comparison function of two cell texts). A cell's
 * data-sort-value attribute, when present, is sorted instead of its text.
 * Part of cbn (BSD-3-Clause); see benchmarks/asv_offline.py. */
(function ($) {
  var builtin = {
    "int": function (a, b) { return parseInt(a, 10) - parseInt(b, 10); },
    "float": function (a, b) { return parseFloat(a) - parseFloat(b); },
    "string": function (a, b) { return a.toString().localeCompare(b.toString()); }
  };

  function cellValue(cell) {
    var v = $(cell).attr("data-sort-value");
    return v === undefined ? $(cell).text() : v;
  }

  function sortBy($table, th, direction) {
    var $th = $(th);
    var column = $th.index();
    var type = $th.attr("data-sort");
    var fns = $.extend({}, builtin, $table.data("stupidsort-fns") || {});
    var cmp = fns[type];
    if (!cmp) { return; }
    if (direction !== "asc" && direction !== "desc") {
      direction = $th.data("sort-dir") === "asc" ? "desc" : "asc";
    }
    $table.children("tbody").each(function () {
      var rows = $(this).children("tr").get();
      var keyed = rows.map(function (row, i) {
        return {row: row, i: i, v: cellValue($(row).children().eq(column))};
      });
      keyed.sort(function (a, b) {
        var c = cmp(a.v, b.v);
        if (c !== c) { c = 0; }               /* NaN: keep the order */
        if (direction === "desc") { c = -c; }
        return c !== 0 ? c : a.i - b.i;
      });
      var body = this;
      keyed.forEach(function (k) { body.appendChild(k.row); });
    });
    $table.find("thead th").data("sort-dir", null);
    $th.data("sort-dir", direction);
    $table.trigger("aftertablesort", {column: column, direction: direction, $th: $th});
  }

  $.fn.stupidtable = function (sortFns) {
    return this.each(function () {
      var $table = $(this);
      $table.data("stupidsort-fns", sortFns || {});
      $table.on("click.stupidtable", "thead th", function () {
        if ($(this).attr("data-sort") !== undefined) { sortBy($table, this); }
      });
    });
  };

  $.fn.stupidsort = function (direction) {
    return this.each(function () {
      var $table = $(this).closest("table");
      sortBy($table, this, direction);
    });
  };
})(jQuery);
