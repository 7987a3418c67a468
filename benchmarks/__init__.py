"""AmberDB's benchmark suite: the same workloads on AmberDB and ZODB 6, side by side.

Run ``./scripts/bench --help``.  Layout: :mod:`benchmarks.run` (command line, orchestration),
:mod:`benchmarks.worker` (one sample in a fresh process), :mod:`benchmarks.workloads` (the
workloads), :mod:`benchmarks.engines` (AmberDB and ZODB behind one interface),
:mod:`benchmarks.spec` (metrics and targets), :mod:`benchmarks.sizes`, :mod:`benchmarks.report`,
:mod:`benchmarks.servers` (the server processes of the ``server`` workload: ``amberdb serve``
and ZEO's ``runzeo``).  The ``postgresql`` and ``sqlite`` workloads
(:mod:`benchmarks.workloads.sql`) put AmberDB's relational storages next to RelStorage 4.
"""
