"""FileStorage: the embedded default storage, one append-only file per database."""

from amberdb.storage.file.recovery import Damage
from amberdb.storage.file.storage import FileStorage
from amberdb.storage.file.verify import Problem, VerifyReport, verify

__all__ = ["Damage", "FileStorage", "Problem", "VerifyReport", "verify"]
