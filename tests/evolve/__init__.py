"""Acceptance tests of schema evolution (issue 15): broken objects, class renames, schema
generations, ``evolve.each``, rolling upgrades with versioned classes, ``make_plain``."""
