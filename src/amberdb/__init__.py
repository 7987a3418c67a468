"""AmberDB: a transactional object database for Python."""
