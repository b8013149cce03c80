"""Misuses of cbn's API that ``mypy --strict`` must report (never run).

Each line marked ``# E`` must get an error from mypy, and no other line may: this shows that
mypy sees cbn's annotations (and the compiled module's stub) rather than ``Any``.
"""

from __future__ import annotations

import numpy as np

import cbn

x = np.zeros((4, 3), np.float32)
label: str = cbn.batch_norm(x, None, None, training=True)  # E
cbn.batch_norm(x, None, None, training=True, momentum="0.1")  # E
cbn.set_num_threads("2")  # E
flag: str = cbn.openmp_enabled()  # E
count: str = cbn.get_num_threads()  # E
bn = cbn.BatchNorm1d(3)
bn.num_features = "three"  # E
same: cbn.BatchNorm2d = cbn.BatchNorm1d(3).eval()  # E
state: list[int] = bn.state_dict()  # E
cbn.fold(np.eye(3), None, bn, True)  # E (transpose is keyword-only)
cbn.BatchNorm2d(3, bias="no")  # E
keras_bn: cbn.BatchNorm2d = cbn.BatchNorm1d.from_keras([], {})  # E
loaded = cbn.load(3)  # E
