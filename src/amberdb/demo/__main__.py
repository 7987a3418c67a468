"""``python -m amberdb.demo``: runs the demo (the classes live in ``amberdb.demo``)."""

from amberdb.demo import main

raise SystemExit(main())
