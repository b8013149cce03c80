/* asv 0.6's dashboard was written against flot 0.8; Debian ships flot 4.2, whose legend is
 * drawn in SVG: without a background colour its box is black, and the HTML that asv's
 * labelFormatter returns does not show as SVG text. This wraps $.plot so that legends get a
 * white background and plain-text labels. Loaded right after flot by
 * benchmarks/asv_offline.py. Part of cbn (BSD-3-Clause). */
(function ($) {
  var flot = $.plot;
  var wrapped = function (placeholder, data, options) {
    if (options && options.legend) {
      var format = options.legend.labelFormatter;
      options.legend = $.extend({backgroundColor: "#ffffff", backgroundOpacity: 0.85},
                                options.legend);
      if (format) {
        options.legend.labelFormatter = function (label, series) {
          return $("<div>").html(format(label, series)).text();
        };
      }
    }
    return flot(placeholder, data, options);
  };
  $.extend(wrapped, flot);          // plugins, version and the rest, shared with flot's
  $.plot = wrapped;
})(jQuery);
