"""The conformance kit as an outside storage author uses it: a buggy storage fails, clearly.

The author's test module is written to a temporary directory and run by pytest in a child
process, as their own suite would run: what they see is the child's report.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

AUTHORS_TESTS = textwrap.dedent(
    """
    import threading

    from amberdb.storage.memory import MemoryStorage
    from amberdb.testing import MemoryStorageFactory, conformance_suite


    class BeginsTwice(MemoryStorage):
        # The author's lock is taken in begin() and given back at finish or abort, with no
        # check for a thread beginning again: its second begin() waits for itself.
        def __init__(self):
            super().__init__()
            self.gate = threading.Lock()
            self.open = False

        def begin(self, meta):
            self.gate.acquire()
            super().begin(meta)
            self.open = True

        def finish(self):
            tid = super().finish()
            self.open = False
            self.gate.release()
            return tid

        def abort(self):
            super().abort()
            if self.open:
                self.open = False
                self.gate.release()


    class PollsOneTooMany(MemoryStorage):
        # Off by one: also reports what the transaction at `since` itself changed.
        def poll_invalidations(self, since):
            newest, changed = super().poll_invalidations(since)
            if changed is not None and since != newest:
                changed = set(changed)
                for txn in self.iterator(since, since):
                    changed.update(record.oid for record in txn.records)
            return newest, changed


    class BeginsTwiceFactory(MemoryStorageFactory):
        blocking_timeout = 1.0

        def create(self):
            return self.track(BeginsTwice())


    class PollsOneTooManyFactory(MemoryStorageFactory):
        def create(self):
            return self.track(PollsOneTooMany())


    TestBeginsTwice = conformance_suite(BeginsTwiceFactory)
    TestPollsOneTooMany = conformance_suite(PollsOneTooManyFactory)
    """
)


def test_the_kit_fails_a_buggy_storage_in_time_with_a_message_naming_the_rule(tmp_path: Path) -> None:
    # Defects: (1) a storage whose second begin() in one thread blocks (nothing in base.py
    # said it must raise) hung the kit's test_protocol_errors forever, with no message at
    # all; (2) the kit's assertions were not rewritten by pytest (it is not a test module),
    # so a wrong poll failed with a bare "AssertionError" and the author had to read the
    # kit's source to learn what their storage did wrong.
    (tmp_path / "test_authors_storage.py").write_text(AUTHORS_TESTS)
    run = subprocess.run(
        [
            sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
            "-k", "test_protocol_errors or test_poll_names_changed_objects",
            "test_authors_storage.py",
        ],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    report = run.stdout + run.stderr
    assert run.returncode == 1, report
    assert "2 failed, 2 passed" in report, report
    # The double begin: a failure within the kit's timeout, saying what was expected.
    assert "TestBeginsTwice::test_protocol_errors" in report, report
    assert "begin() called again by the thread whose transaction is open" in report, report
    assert "StorageTransactionError" in report, report
    # The poll: the rule broken, and the oids involved.
    assert "TestPollsOneTooMany::test_poll_names_changed_objects" in report, report
    assert "invariant 7" in report, report
    assert "since < tid <= newest" in report, report
