"""Data-parallel training of the digits MLP with SyncBatchNorm (see examples/digits.py).

Every rank builds the same network (same seed) and walks the same shuffled mini-batches of
32; rank r trains on its contiguous share of each batch (the shares of 4 ranks are 8
images, and the epoch's last batch of 3 leaves one rank empty). The BN layers are
:class:`cbn.SyncBatchNorm` (converted with ``SyncBatchNorm.from_module``), so their
statistics and input gradients are those of the whole batch; the loss gradient is scaled
to the global batch, and after the backward every parameter gradient is summed over the
ranks in one deterministic exchange (:func:`cbn.distributed.all_reduce`). Every rank then
takes the same Adam step: the ranks hold identical weights, equal to float32 rounding to
those of one process training on the concatenated batches, which ``--check`` trains next
to rank 0 and compares after every epoch. (Sums taken in another order round differently,
and training amplifies such differences like any other: here about 4e-8 after one step,
1e-5 after the first epoch, and percents once the two runs part ways, around epoch 7.)

    mpiexec -n 4 python examples/data_parallel.py     # 4 processes (pip install "cbn[mpi]")
    python examples/data_parallel.py --threads 4      # 4 ranks as threads of one process
    mpiexec -n 4 python examples/data_parallel.py --epochs 1 --check

Prints the test accuracy after every epoch, the time spent in communication (cbn's
collectives, waiting for the other ranks included) and, with ``--check``, the largest
difference to the one-process weights. Needs scikit-learn for the data set.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # find _mlp and digits when run through runpy or importlib too
    sys.path.insert(0, _HERE)
from _mlp import Adam, batches, cross_entropy  # noqa: E402
from digits import BATCH_SIZE, HIDDEN, LR, MLP, load_data  # noqa: E402

import cbn  # noqa: E402
from cbn import distributed  # noqa: E402

EPOCHS = 10


def parameters(net: MLP) -> List[np.ndarray]:
    """The network's parameters, in a fixed order."""
    ps = []
    for layer in net.linears + [net.head]:
        ps += [p for p, _ in layer.params_and_grads()]
    for bn in net.bns:
        ps += [bn.weight, bn.bias]
    return ps


def gradients(net: MLP) -> List[np.ndarray]:
    """The gradients of :func:`parameters`, in the same order."""
    gs = []
    for layer in net.linears + [net.head]:
        gs += [g for _, g in layer.params_and_grads()]
    for bn in net.bns:
        gs += [bn.grad_weight, bn.grad_bias]
    return gs


def weight_diff(net: MLP, ref: MLP) -> float:
    """Largest |w - w_ref| / max(1, max|w_ref|) over the parameter arrays."""
    return max(float(np.max(np.abs(p - q))) / max(1.0, float(np.max(np.abs(q))))
               for p, q in zip(parameters(net), parameters(ref)))


def train_step(net: MLP, opt: Adam, x: np.ndarray, y: np.ndarray, n_global: int,
               comm: Any = None) -> None:
    """One step on this rank's share (x, y) of a global batch of n_global images."""
    logits = net.forward(x)
    if len(x):
        _, grad = cross_entropy(logits, y)
        grad *= np.float32(len(x) / n_global)    # the global batch's mean loss
    else:
        grad = np.zeros_like(logits)
    net.backward(grad)
    if comm is not None:
        distributed.all_reduce(gradients(net), comm)
    net.step(opt)


def run(args: argparse.Namespace, comm: Any) -> Dict[str, object]:
    """Train on this rank; returns the numbers main() reports (on every rank)."""
    ch = distributed.as_communicator(comm)
    rank, size = ch.rank, ch.size
    train_x, test_x, train_y, test_y = load_data(args.seed)
    sizes = (train_x.shape[1],) + HIDDEN + (10,)
    say = print if rank == 0 else (lambda *a, **k: None)
    say(f"digits: {len(train_x)} training and {len(test_x)} test images; MLP "
        f"{' -> '.join(map(str, sizes))} with SyncBatchNorm, {size} rank(s), global batch "
        f"{BATCH_SIZE}, Adam lr {LR}, {args.epochs} epochs")

    net = MLP(sizes, True, np.random.default_rng(args.seed))
    net.bns = [cbn.SyncBatchNorm.from_module(bn, ch) for bn in net.bns]
    opt = Adam(lr=LR)
    ref = ref_opt = None
    if args.check and rank == 0:        # one process on the concatenated batches
        ref = MLP(sizes, True, np.random.default_rng(args.seed))
        ref_opt = Adam(lr=LR)
    order_rng = np.random.default_rng(args.seed + 1)
    accuracy: List[float] = []
    diffs: List[float] = []
    t_start = time.perf_counter()
    c_start = distributed.communication_time(ch)
    steps = 0
    for epoch in range(args.epochs):
        for idx in batches(len(train_x), BATCH_SIZE, order_rng):
            if len(idx) < 2:                 # BN needs more than one value per channel
                continue
            if args.steps and steps == args.steps:
                break
            steps += 1
            share = np.array_split(idx, size)[rank]
            train_step(net, opt, train_x[share], train_y[share], len(idx), ch)
            if ref is not None:
                train_step(ref, ref_opt, train_x[idx], train_y[idx], len(idx))
        accuracy.append(net.accuracy(test_x, test_y))
        line = f"epoch {epoch:2d}: test accuracy {accuracy[-1]:.4f}"
        if ref is not None:
            diffs.append(weight_diff(net, ref))
            line += f"   weights differ from one process by {diffs[-1]:.1e}"
        say(line)
    seconds = time.perf_counter() - t_start
    comm_seconds = distributed.communication_time(ch) - c_start
    say(f"final test accuracy {accuracy[-1]:.4f}; {seconds:.2f} s training, of which "
        f"{comm_seconds:.2f} s in communication (rank 0)")
    result: Dict[str, object] = {"accuracy": accuracy, "final": accuracy[-1], "ranks": size,
                                 "seconds": seconds, "comm_seconds": comm_seconds}
    if ref is not None:
        bn_stats = max(float(np.max(np.abs(a.running_var - b.running_var)))
                       for a, b in zip(net.bns, ref.bns))
        result["weight_diff"] = diffs
        result["max_running_var_diff"] = bn_stats
        result["ref_final"] = ref.accuracy(test_x, test_y)
        say(f"check: largest weight difference to one process on the concatenated batches "
            f"{diffs[-1]:.2e} (relative to max(1, |w|)); running_var {bn_stats:.2e}; its "
            f"test accuracy {result['ref_final']:.4f}")
    return result


def run_threads(args: argparse.Namespace) -> Dict[str, object]:
    """``args.threads`` ranks as threads of this process; rank 0's result."""
    comms = distributed.ThreadCommunicator.create(args.threads, timeout=600)
    results: List[Any] = [None] * args.threads

    def target(r: int) -> None:
        try:
            results[r] = run(args, comms[r])
        except BaseException as e:  # noqa: BLE001 -- re-raised below
            results[r] = e
            comms[r].abort()

    threads = [threading.Thread(target=target, args=(r,)) for r in range(args.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results[0]


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """Returns ``{"accuracy": [...], "final": float, "ranks": n, "seconds": s,
    "comm_seconds": s}`` plus, with ``--check`` (rank 0), ``"weight_diff"`` (after each
    epoch, see :func:`weight_diff`), ``"max_running_var_diff"`` and ``"ref_final"``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=EPOCHS, help=f"default {EPOCHS}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0,
                   help="run this many ranks as threads of one process instead of MPI")
    p.add_argument("--steps", type=int, default=0,
                   help="stop after this many steps in all (a quick run)")
    p.add_argument("--check", action="store_true",
                   help="also train one process on the concatenated batches and compare")
    args = p.parse_args(argv)
    if args.epochs < 1:
        p.error("--epochs must be >= 1")
    if args.threads:
        return run_threads(args)
    return run(args, None)                   # MPI.COMM_WORLD


if __name__ == "__main__":
    main()
