"""cbn's build and run-time configuration: :func:`show_config`."""

from __future__ import annotations

import os
import platform
from typing import Any, Dict, Optional

import numpy as np

from . import _kernels
from ._threads import get_num_threads

__all__ = ["show_config", "config"]


def config() -> Dict[str, Any]:
    """The configuration as a dict (what :func:`show_config` prints).

    Examples
    --------
    >>> import cbn
    >>> c = cbn._config.config()
    >>> c["cpu_target"] in [name for name, _ in c["cpu_targets"]]
    True
    """
    from . import __version__
    return {
        "version": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "machine": platform.machine(),
        "openmp": bool(_kernels.openmp_enabled()),
        "threads": get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu_target": _kernels.cpu_target(),
        "cpu_targets": _kernels.cpu_targets(),
        "cpu_target_forced": os.environ.get("CBN_CPU_TARGET") or None,
        "build_flags": _kernels.build_flags(),
    }


def show_config(mode: str = "stdout") -> Optional[Dict[str, Any]]:
    """Print (``mode="stdout"``) or return (``mode="dicts"``) how cbn was built and what
    it runs: version, OpenMP, thread count, the CPU target of the C loops in use and those
    compiled in (with whether this CPU supports each), the compiler flags.

    Examples
    --------
    >>> import cbn
    >>> sorted(cbn.show_config(mode="dicts"))[:3]
    ['build_flags', 'cpu_count', 'cpu_target']
    """
    c = config()
    if mode == "dicts":
        return c
    if mode != "stdout":
        raise ValueError(f"mode must be 'stdout' or 'dicts', got {mode!r}")
    targets = ", ".join(f"{n}{'' if ok else ' (not on this CPU)'}"
                        for n, ok in c["cpu_targets"])
    forced = f" (forced by CBN_CPU_TARGET={c['cpu_target_forced']})" \
        if c["cpu_target_forced"] else ""
    print(f"cbn {c['version']} (numpy {c['numpy']}, Python {c['python']}, {c['machine']})\n"
          f"  OpenMP:        {'on' if c['openmp'] else 'off (serial kernels)'}\n"
          f"  threads:       {c['threads']} (os.cpu_count() = {c['cpu_count']})\n"
          f"  CPU target:    {c['cpu_target']}{forced}\n"
          f"  compiled for:  {targets}\n"
          f"  build flags:   {c['build_flags']}")
    return None
