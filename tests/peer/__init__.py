"""The peer suites: BTrees' and transaction's own tests, run against AmberDB (see README.md here)."""
