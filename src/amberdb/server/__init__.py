"""The AmberDB server: one asyncio loop serving a storage to ``ClientStorage`` clients.

So far :mod:`.protocol`, the wire format both sides speak (issue 13 builds the rest on it).
"""
