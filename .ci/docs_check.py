"""Checks of .ci/docs: what a reader of the API reference and of the asv dashboard sees.

    python .ci/docs_check.py extras NAME...            pip requirements of pyproject's extras
    python .ci/docs_check.py api DOM                    the rendered cbn.batch_norm page
    python .ci/docs_check.py asv-config DIR [no-filter] an asv config writing under DIR
    python .ci/docs_check.py asv-slow RESULTS HASH F    multiply one commit's results by F
    python .ci/docs_check.py asv-regressions HTML [CONTROL_HTML]
                                                        Regressions: cbn's rows, no baseline
    python .ci/docs_check.py asv-grid DOM [N]           the summary grid drew N graphs
    python .ci/docs_check.py png FILE                   a chart was drawn

DOM files are what ``chromium --headless --dump-dom`` printed: the page after its scripts
ran. Each check exits non-zero with a message saying what is missing.
"""

from __future__ import annotations

import html
import inspect
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: The implementations asv.conf.json keeps out of regression detection.
BASELINES = ("numpy", "copy", "cbn+numpy")


def fail(message: str) -> None:
    print(f"docs_check: FAILED: {message}", file=sys.stderr)
    sys.exit(1)


def extras(names):
    try:
        import tomllib
    except ImportError:                                  # Python 3.10
        import tomli as tomllib
    with open(ROOT / "pyproject.toml", "rb") as f:
        table = tomllib.load(f)["project"]["optional-dependencies"]
    print(" ".join(req for n in names for req in table[n]))


def _text(dom: str) -> str:
    """The visible text of a DOM dump, whitespace collapsed."""
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", dom)).split())


def api(dom_path):
    dom = Path(dom_path).read_text()
    text = _text(dom)
    import cbn
    sig = inspect.signature(cbn.batch_norm)
    # the signature as the page shows it: names and defaults in order
    if not re.search(r'<dt class="sig sig-object py" id="cbn\.batch_norm">', dom):
        fail("no signature block for cbn.batch_norm on the page")
    shown = _text(dom.split('id="cbn.batch_norm"', 1)[1].split("</dt>", 1)[0])
    pos = 0
    for name, p in sig.parameters.items():
        at = shown.find(name, pos)
        if at < 0:
            fail(f"parameter {name!r} missing from the rendered signature: {shown[:300]}")
        pos = at + len(name)
        if p.default is not inspect.Parameter.empty and p.default is not None:
            if repr(p.default) not in shown:
                fail(f"default {name}={p.default!r} missing from the signature")
    for junk in ("Union[", "_SupportsArray", "TypeAliasForwardRef", "ForwardRef("):
        if junk in shown:
            fail(f"the signature shows {junk!r}: {shown[:300]}")
    # the Parameters section: every parameter with its description
    params = dom.split(">Parameters<", 1)
    if len(params) != 2:
        fail("no Parameters section on the page")
    section = params[1].split(">Returns<", 1)[0]
    listed = [n.strip() for group in re.findall(r"<strong>([\w, ]+)</strong>", section)
              for n in group.split(",")]           # "running_mean, running_var" is two
    missing = [n for n in sig.parameters if n not in listed]
    if missing:
        fail(f"parameters not described on the page: {missing}")
    if "Returns" not in text:
        fail("no Returns section on the page")
    print(f"docs_check: batch_norm page: signature with {len(sig.parameters)} parameters "
          f"and defaults, each described ({', '.join(listed)})")


def asv_config(directory, variant="as-is"):
    """The repository's asv.conf.json, writing its results and HTML under DIRECTORY (so
    that this check leaves the checkout's .asv alone); its regression settings as they are,
    or, with variant "no-filter", without ``regressions_first_commits`` and writing its
    HTML to DIRECTORY/html-no-filter (the control: there the baselines must show up)."""
    text = (ROOT / "asv.conf.json").read_text()
    conf = json.loads(re.sub(r"^\s*//.*$", "", text, flags=re.M))
    d = Path(directory).resolve()
    # the dashboard shows the commits of its branches: the one checked out (main in CI)
    import subprocess
    branch = subprocess.run(["git", "symbolic-ref", "--short", "-q", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    conf.update(repo=str(ROOT), benchmark_dir=str(ROOT / "benchmarks"),
                env_dir=str(d / "env"), results_dir=str(d / "results"),
                html_dir=str(d / "html"),
                branches=[branch or conf.get("branches", ["main"])[0]])
    name = "asv.conf.json"
    if variant == "no-filter":
        conf.pop("regressions_first_commits", None)
        conf["html_dir"] = str(d / "html-no-filter")
        name = "asv-no-filter.conf.json"
    elif variant != "as-is":
        fail(f"unknown variant {variant!r}")
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_text(json.dumps(conf, indent=1))
    print(d / name)


def asv_slow(results_dir, commit, factor):
    """Multiply every result of COMMIT by FACTOR: a simulated slowdown of everything, cbn
    and baselines alike, so that regression detection has something to find and the check
    can see which rows it reports."""
    factor = float(factor)
    files = [p for p in Path(results_dir).rglob(f"{commit[:8]}*.json")]
    if not files:
        fail(f"no asv results of {commit} under {results_dir}")

    def scale(v):
        if isinstance(v, list):
            return [scale(x) for x in v]
        return v * factor if isinstance(v, (int, float)) and not isinstance(v, bool) else v

    for path in files:
        doc = json.loads(path.read_text())
        cols = doc.get("result_columns", [])
        at = cols.index("result") if "result" in cols else 0
        for name, row in doc["results"].items():
            row[at] = scale(row[at])
        path.write_text(json.dumps(doc))
    print(f"docs_check: results of {commit[:8]} x {factor} ({len(files)} file(s))")


def _regressions(html_dir):
    path = Path(html_dir) / "regressions.json"
    if not path.is_file():
        fail(f"{path} is missing (asv publish)")
    names = [r[0] for r in json.loads(path.read_text()).get("regressions", [])]
    pattern = r"'(" + "|".join(re.escape(b) for b in BASELINES) + r")'[,)]"
    return names, [n for n in names if re.search(pattern, n)]


def asv_regressions(html_dir, control=None):
    """The Regressions of HTML_DIR list cbn's rows and none of a baseline; those of the
    CONTROL (published without the filter) do list baselines, so the filter is what
    keeps them out."""
    names, baseline = _regressions(html_dir)
    if not names:
        fail("the simulated slowdown produced no regression at all: detection is off")
    if baseline:
        fail(f"baseline rows listed as regressions: {baseline[:5]}")
    if control is not None:
        c_names, c_baseline = _regressions(control)
        if not c_baseline:
            fail("without the filter no baseline row is listed either: the check proves "
                 "nothing (run a benchmark with an implementation='numpy' row)")
        print(f"docs_check: without asv.conf.json's filter {len(c_names)} regressions, "
              f"{len(c_baseline)} of them baselines (e.g. {c_baseline[0]})")
    print(f"docs_check: {len(names)} regressions listed, none of a baseline "
          f"({', '.join(BASELINES)}); e.g. {names[0]}")


def asv_grid(dom_path, expect="1"):
    """The summary grid drew a graph (a canvas) in at least EXPECT benchmark boxes (the
    benchmarks that have results; boxes without results stay empty)."""
    dom = Path(dom_path).read_text()
    if "benchmark-plot" not in dom:
        fail("the summary grid has no benchmark boxes (redirected to the error page?)")
    plots = dom.split('class="benchmark-plot"')[1:]
    drawn = [p for p in plots if "<canvas" in p.split('class="benchmark-text"', 1)[0]]
    if len(drawn) < int(expect):
        fail(f"{len(drawn)} of the {len(plots)} benchmark boxes drew a graph (no canvas); "
             f"expected {expect}")
    print(f"docs_check: summary grid: {len(drawn)} of {len(plots)} boxes drew a graph "
          f"(the others have no results in this run)")


def png(path):
    data = Path(path).read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n" or len(data) < 10000:
        fail(f"{path} is not a drawn PNG")
    print(f"docs_check: {path}: PNG, {len(data)} bytes")


def main(argv):
    if not argv:
        fail("usage: docs_check.py COMMAND ARGS (see the docstring)")
    command, args = argv[0], argv[1:]
    table = {"extras": lambda: extras(args), "api": lambda: api(*args),
             "asv-config": lambda: asv_config(*args), "asv-slow": lambda: asv_slow(*args),
             "asv-regressions": lambda: asv_regressions(*args),
             "asv-grid": lambda: asv_grid(*args), "png": lambda: png(*args)}
    if command not in table:
        fail(f"unknown command {command!r}")
    table[command]()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
