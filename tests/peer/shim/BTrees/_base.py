"""The one name of BTrees' private ``_base`` that the test helpers import at module level.

``BTrees.tests.common`` imports ``_tp_name`` to build expected error messages; without it no
test module would load.  Everything else of ``_base`` is the real implementation and is left
out, so the tests of it (``test__base``) fail on import and are excluded as internals.
"""

from __future__ import annotations


def _tp_name(typ: type) -> str:
    """``module.Name`` of a class, as the real helper spells it."""
    return f"{typ.__module__}.{typ.__name__}"
