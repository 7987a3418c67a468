"""The AmberDB server: one asyncio loop serving a storage to ``ClientStorage`` clients.

* :mod:`.protocol` -- the wire format both sides speak (frames, values, messages, errors);
* :mod:`.auth` -- tokens and the tokens file;
* :mod:`.server` -- :class:`StorageServer` (``amberdb serve``);
* :mod:`.client` -- :class:`ClientStorage`, the storage an application opens.
"""

from amberdb.server.client import ClientStorage
from amberdb.server.server import StorageServer

__all__ = ["ClientStorage", "StorageServer"]
