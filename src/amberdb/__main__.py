"""``python -m amberdb``: the ``amberdb`` command (:mod:`amberdb.cli`)."""

import sys

from amberdb.cli import main

sys.exit(main())
