"""``mpiexec -n N python -m cbn.distributed``: SyncBatchNorm's overhead on every rank."""

from ._overhead import _overhead_main

raise SystemExit(_overhead_main())
