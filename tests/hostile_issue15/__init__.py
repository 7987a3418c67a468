"""Hostile tests for issue 15 (schema evolution): broken objects, renames, evolve."""
