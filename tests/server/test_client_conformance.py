"""The conformance kit against ClientStorage: a client of a server (a thread of this process,
on 127.0.0.1) serving a FileStorage passes everything the embedded storages pass."""

from __future__ import annotations

from amberdb.testing import ClientStorageFactory, conformance_suite

TestClientStorage = conformance_suite(ClientStorageFactory)
