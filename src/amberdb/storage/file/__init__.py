"""FileStorage: the embedded default storage, one append-only file per database."""

from amberdb.storage.file.storage import FileStorage

__all__ = ["FileStorage"]
