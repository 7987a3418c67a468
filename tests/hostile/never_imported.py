"""A module no test imports: a record that manages to import it shows up in ``sys.modules``."""

from tests.hostile.sentinels import CALLS

CALLS.append(("tests.hostile.never_imported was imported",))
