/* A small stand-in for the flot-orderbars plugin (1.0.0), which asv 0.6's dashboard loads
 * from a CDN and no Debian or PyPI package ships. Series drawn as bars with
 * `bars: {order: k}` are shifted side by side: series k of n is moved by
 * (k - (n - 1) / 2) bar widths, so that the bars of one x value stand next to each other
 * instead of on top of each other. Part of cbn (BSD-3-Clause); see
 * benchmarks/asv_offline.py. */
(function ($) {
  function init(plot) {
    plot.hooks.processDatapoints.push(function (plot, series, datapoints) {
      if (!series.bars || !series.bars.show || series.bars.order == null) { return; }
      var ordered = plot.getData().filter(function (s) {
        return s.bars && s.bars.show && s.bars.order != null;
      });
      var n = ordered.length;
      if (n < 2) { return; }
      var width = series.bars.barWidth || 0.8;
      if (typeof width === "object") { width = width[0] || 0.8; }
      var each = width / n;
      var shift = (series.bars.order - (n - 1) / 2) * each;
      series.bars.barWidth = each;
      var ps = datapoints.pointsize, pts = datapoints.points;
      for (var i = 0; i < pts.length; i += ps) {
        if (pts[i] != null) { pts[i] += shift; }
      }
    });
  }
  $.plot.plugins.push({init: init, options: {series: {bars: {order: null}}},
                       name: "orderBars", version: "cbn-shim"});
})(jQuery);
