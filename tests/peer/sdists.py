"""The pinned source distributions whose own test suites run against AmberDB.

Each sdist is fetched once with ``pip download`` into ``.peer/`` (git-ignored), checked
against the sha256 pinned here, and only the files the suites need are extracted: the test
modules, plus the few support modules of BTrees that the tests read as *data* about the
expected API (the zope.interface declarations and the key/value type descriptions).  The
implementation modules are never extracted, so nothing of the real packages can be tested
by mistake in place of AmberDB.

Run ``python -m tests.peer.sdists`` to fetch and extract ahead of time (e.g. before going
offline); afterwards the suites need no network.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CACHE", "SDISTS", "Sdist", "prepare"]

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".peer"


@dataclass(frozen=True)
class Sdist:
    """One pinned sdist and the files of its package that the suite needs."""

    project: str
    version: str
    sha256: str
    package: str  # the import name, also the folder under src/ in the sdist
    # Files of the package besides tests/ that the tests import as data (not implementation).
    support: tuple[str, ...] = ()

    @property
    def filename(self) -> str:
        """The file pip saves (sdist names are normalised to lower case)."""
        return f"{self.project.lower()}-{self.version}.tar.gz"

    @property
    def tree(self) -> Path:
        """The folder holding the extracted ``<package>/`` directory."""
        return CACHE / f"{self.project}-{self.version}"


SDISTS = {
    "BTrees": Sdist(
        "BTrees",
        "6.5",
        "1876cad0ebcac3f68dadcdca8018ea6cb76b334f9991a73aa85cbb0cb8fd8cf0",
        "BTrees",
        # Interfaces: the API the ModuleTest/verifyObject tests check against; _datatypes (and
        # utils, which it imports): how the test builder learns each family's key and value
        # types (ranges, examples, coercion); _compat: the PURE_PYTHON switch the tests read.
        support=("Interfaces.py", "_datatypes.py", "utils.py", "_compat.py"),
    ),
    "transaction": Sdist(
        "transaction",
        "5.1",
        "f6ca8639a3e54f6991de0d9c0983a7cd91acb21a825cb544c168269be956bd41",
        "transaction",
        # interfaces: the zope.interface declarations verifyObject checks against (the
        # exceptions in it are replaced by AmberDB's in the shim).
        support=("interfaces.py",),
    ),
}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 16), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(sdist: Sdist) -> Path:
    """The verified sdist file, downloaded with pip unless a good copy is cached."""
    CACHE.mkdir(exist_ok=True)
    path = CACHE / sdist.filename
    if not path.exists() or _sha256(path) != sdist.sha256:
        path.unlink(missing_ok=True)
        # pip, not a URL: the machine's pip configuration names the package index.
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--disable-pip-version-check",
                "--no-deps",
                "--no-binary",
                ":all:",
                "--dest",
                str(CACHE),
                f"{sdist.project}=={sdist.version}",
            ],
            check=True,
        )
    digest = _sha256(path)
    if digest != sdist.sha256:
        raise RuntimeError(f"{path}: sha256 {digest}, pinned {sdist.sha256}; refusing to run its tests")
    return path


def extract(sdist: Sdist, archive: Path) -> Path:
    """Extract the test modules and support files into ``sdist.tree``; return that folder."""
    done = sdist.tree / ".complete"
    if done.exists():
        return sdist.tree
    shutil.rmtree(sdist.tree, ignore_errors=True)
    prefix = f"{sdist.project.lower()}-{sdist.version}/src/{sdist.package}/"
    wanted = {prefix + name for name in sdist.support}
    with tarfile.open(archive) as tar:
        members = [
            member
            for member in tar.getmembers()
            if member.isfile()
            and member.name.endswith(".py")
            and (member.name in wanted or member.name.startswith(prefix + "tests/"))
        ]
        for member in members:
            relative = member.name[len(prefix) :]
            target = sdist.tree / sdist.package / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(member)
            assert source is not None  # a regular file, checked above
            target.write_bytes(source.read())
    done.write_text(f"{sdist.sha256}\n")
    return sdist.tree


def prepare(name: str) -> Path:
    """Fetch (if needed), verify and extract the sdist of suite ``name``; return its tree."""
    sdist = SDISTS[name]
    return extract(sdist, fetch(sdist))


if __name__ == "__main__":
    for suite in SDISTS:
        print(suite, prepare(suite))
