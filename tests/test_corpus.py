"""cbn's results, bit for bit, against the corpus saved from a reference tree.

tests/_corpus.py enumerates the cases (every loop shape of the kernels, both dtypes, the
fused calls, out=, the modules) and tests/data/kernel_corpus.json holds the SHA-256 of
every output as the reference tree computed it. Each case is recomputed here on 1, 2 and
3 threads; a failure names the case, the thread count and the arrays that differ. The
oracle is the saved reference, not the code under test: a kernel rewrite that changes
any result by one bit fails here. Regenerate the corpus only deliberately (see
tests/_corpus.py).
"""

from __future__ import annotations

import pytest

import cbn

import _corpus

CASES = _corpus.cases()
SAVED = _corpus.load()["cases"]


def test_corpus_holds_every_case():
    ids = {c.id for c in CASES}
    missing = sorted(ids - set(SAVED))
    # the bfloat16 cases are enumerated only where ml_dtypes is installed
    extra = sorted(k for k in set(SAVED) - ids
                   if "bf16" in _corpus._DTYPES or "-bf16" not in k)
    assert not missing and not extra, (
        f"cases not in the saved corpus: {missing}; saved cases no longer enumerated: "
        f"{extra}")


def test_parallel_threshold_is_the_corpus_one():
    # The cases were sized around this threshold (just below, at and above it), so that
    # 2 and 3 threads run parallel on the large ones.
    threshold = getattr(getattr(cbn, "_threads", None), "MIN_PARALLEL_SIZE", None)
    if threshold is None:
        pytest.skip("cbn._threads.MIN_PARALLEL_SIZE moved; update _corpus.PARALLEL_SIZE's "
                    "check")
    assert threshold == _corpus.PARALLEL_SIZE


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_results_are_those_of_the_saved_corpus(case):
    saved = SAVED.get(case.id)
    if saved is None:
        pytest.fail(f"{case.id}: not in {_corpus.CORPUS_PATH}")
    inp = _corpus.make_inputs(case)
    assert inp.digest() == saved["inputs"], (
        f"{case.id}: the inputs are not those the corpus was saved with (NumPy's random "
        "generator changed?): regenerate the corpus from a reference tree")
    differ = {}                         # arrays that differ -> thread counts
    for nt in _corpus.THREAD_COUNTS:
        bad = _corpus.compare(saved["outputs"], _corpus.digests(case, inp, nt))
        if bad:
            differ.setdefault(tuple(bad), []).append(str(nt))
    if differ:
        pytest.fail(f"{case.id}: results differ from the saved corpus\n" + "\n".join(
            f"  on {', '.join(nts)} thread(s): {', '.join(bad)}"
            for bad, nts in differ.items()), pytrace=False)
