"""Make asv's published dashboard work without internet: one command after ``asv publish``.

    python benchmarks/asv_offline.py [HTML_DIR]        # default: asv.conf.json's html_dir

asv 0.6 no longer ships the JavaScript its dashboard needs: ``asv publish`` writes pages
that load jQuery, flot (with its time, selection and categories plugins), flot-orderbars,
stupidtable, blueimp-md5 and Bootstrap 3 from CDNs, and offline they redirect to an error
page. This script copies those files into ``HTML_DIR/vendor/`` from Debian's packages and
points every page at them (the CDN tags, with their integrity hashes, are replaced):

    apt-get install libjs-jquery libjs-jquery-flot libjs-bootstrap node-blueimp-md5

Debian's flot is 4.2 (asv was written against 0.8.3): its ``jquery.flot.js`` holds the core
and the time, selection, categories and axis-label plugins that asv uses; the two plugins
no package ships, stupidtable and flot-orderbars, are small stand-ins kept next to this file
(``benchmarks/asv_offline_js/``), with ``flot4-compat.js``, which gives flot 4's SVG legend
the white background and plain-text labels asv's 0.8-era options assume. ``.ci/docs`` publishes a run, applies this, and checks in a
headless browser that the summary grid draws its graphs with no network.

(asv imports every module of benchmarks/ while discovering benchmarks: this one defines none
and does nothing on import.)
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

HERE = Path(__file__).resolve().parent
SHIMS = HERE / "asv_offline_js"
JS = Path("/usr/share/javascript")

#: (what a CDN URL contains, local file name, source file, Debian package); a source of
#: None drops the tag (the bundle loaded by an earlier tag holds it).
VENDOR = [
    ("code.jquery.com/jquery-", "jquery.min.js", JS / "jquery" / "jquery.min.js",
     "libjs-jquery"),
    ("flot/0.8.3/jquery.flot.min.js", "jquery.flot.js", JS / "jquery-flot" / "jquery.flot.js",
     "libjs-jquery-flot"),
    ("flot4-compat", "flot4-compat.js", SHIMS / "flot4-compat.js", None),
    ("flot/0.8.3/jquery.flot.time.min.js", None, None, "libjs-jquery-flot"),
    ("flot/0.8.3/jquery.flot.selection.min.js", None, None, "libjs-jquery-flot"),
    ("flot/0.8.3/jquery.flot.categories.min.js", None, None, "libjs-jquery-flot"),
    ("flot-orderbars", "jquery.flot.orderBars.js", SHIMS / "jquery.flot.orderBars.js", None),
    ("stupidtable", "stupidtable.js", SHIMS / "stupidtable.js", None),
    ("blueimp-md5", "md5.js", Path("/usr/share/nodejs/blueimp-md5/js/md5.js"),
     "node-blueimp-md5"),
    ("bootstrap@3.1.1/dist/js/bootstrap.min.js", "bootstrap.min.js",
     JS / "bootstrap" / "js" / "bootstrap.min.js", "libjs-bootstrap"),
    ("bootstrap@3.1.1/dist/css/bootstrap.min.css", "css/bootstrap.min.css",
     JS / "bootstrap" / "css" / "bootstrap.min.css", "libjs-bootstrap"),
]
#: asv's own flot 0.8 axis-label plugin: Debian's flot 4 bundle has its own, so asv's copy
#: (which would register a second one) is dropped too.
ASV_AXISLABELS = "jquery.flot.axislabels.js"
#: Bootstrap's icon font, which its CSS loads from ../fonts/ (relative to vendor/css/).
FONTS = JS / "bootstrap" / "fonts"

_TAG = re.compile(r"<(script|link)\b[^>]*?(?:src|href)=\"([^\"]+)\"[^>]*>(?:\s*</script>)?",
                  re.S)


def html_dir_from_config(root: Path) -> Path:
    """``html_dir`` of ``root/asv.conf.json`` (asv's JSON allows // comments)."""
    text = (root / "asv.conf.json").read_text()
    text = re.sub(r"^\s*//.*$", "", text, flags=re.M)
    return root / json.loads(text).get("html_dir", "html")


def missing_sources() -> List[str]:
    """Debian packages (or files) that this machine lacks, for a clear error."""
    out = []
    for _, _, src, package in VENDOR:
        if src is not None and not src.is_file():
            out.append(package or str(src))
    return sorted(set(out))


def _replacement(tag: str, url: str) -> Optional[str]:
    """The tag that replaces ``tag`` (which loads ``url``), "" to drop it, None to keep."""
    for needle, name, src, _ in VENDOR:
        if needle in url:
            if name is None:
                return ""
            if name.endswith(".css"):
                return f'<link rel="stylesheet" href="vendor/{name}">'
            tag = f'<script type="text/javascript" src="vendor/{name}"></script>'
            if name == "jquery.flot.js":                 # flot 4 with asv's 0.8 options
                tag += '\n    <script type="text/javascript" src="vendor/flot4-compat.js"></script>'
            return tag
    if url == ASV_AXISLABELS:
        return ""
    return None


def rewrite(html: str) -> str:
    """``html`` with every CDN tag pointing at ``vendor/`` (idempotent)."""
    def sub(m: "re.Match[str]") -> str:
        new = _replacement(m.group(0), m.group(2))
        return m.group(0) if new is None else new
    return _TAG.sub(sub, html)


def make_offline(html_dir: Path) -> Dict[str, int]:
    """Copy the scripts into ``html_dir/vendor`` and rewrite every page. Returns
    {page: number of tags replaced}."""
    missing = missing_sources()
    if missing:
        raise SystemExit("asv_offline: missing " + ", ".join(missing) +
                         "; install them with: apt-get install " + " ".join(missing))
    pages = sorted(html_dir.glob("*.html"))
    if not pages:
        raise SystemExit(f"asv_offline: no .html files in {html_dir} (run asv publish first)")
    vendor = html_dir / "vendor"
    (vendor / "css").mkdir(parents=True, exist_ok=True)
    for _, name, src, _ in VENDOR:
        if name is not None:
            shutil.copyfile(src, vendor / name)
    if FONTS.is_dir():
        shutil.copytree(FONTS, vendor / "fonts", dirs_exist_ok=True)
    changed = {}
    for page in pages:
        old = page.read_text()
        new = rewrite(old)
        changed[page.name] = sum(1 for m in _TAG.finditer(old)
                                 if _replacement(m.group(0), m.group(2)) is not None)
        if new != old:
            page.write_text(new)
    left = [(p.name, u) for p in pages for u in re.findall(r"(?:src|href)=\"(https?://[^\"]+)\"",
                                                          p.read_text())
            if not u.startswith("https://github.com/")]
    if left:
        raise SystemExit(f"asv_offline: pages still load from the network: {left}")
    return changed


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("html_dir", nargs="?", help="asv's published HTML (default: html_dir "
                   "of asv.conf.json, .asv/html)")
    args = p.parse_args(argv)
    root = HERE.parent
    html_dir = Path(args.html_dir) if args.html_dir else html_dir_from_config(root)
    changed = make_offline(html_dir)
    print(f"asv_offline: {html_dir}: " + ", ".join(f"{k} ({v} tags)" for k, v in
                                                   changed.items() if v) +
          "; scripts in vendor/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
