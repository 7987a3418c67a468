"""``evolve.make_plain`` and back: a class that stopped being persistent becomes plain values
inside the one object referring to each instance; made persistent again, the inline values
load as persistent objects and become records of their own at their next change."""

from __future__ import annotations

from pathlib import Path

import amberdb
from amberdb.record import decode_header
from amberdb.storage.history import iter_current_records
from tests.evolve.helpers import run_child, write_module
from tests.server.procs import Processes

SHOP_PERSISTENT = """
    from amberdb import Persistent


    class Address(Persistent):
        def __init__(self, street, city):
            self.street = street
            self.city = city


    class Customer(Persistent):
        def __init__(self, name, address):
            self.name = name
            self.address = address
"""

SHOP_PLAIN = """
    from amberdb import Persistent


    class Address:
        def __init__(self, street, city):
            self.street = street
            self.city = city


    class Customer(Persistent):
        def __init__(self, name, address):
            self.name = name
            self.address = address
"""

STORE = """
    from shop import Address, Customer
    db = amberdb.DB(sys.argv[1], allowed_modules=["shop"])
    conn = db.open()
    customers = [Customer(f"c{n}", Address(f"{n} Main St", f"city{n}")) for n in range(3)]
    conn.root()["customers"] = amberdb.PersistentList(customers)
    transaction.commit()
    out({"addresses": [getattr(c.address, "_p_oid", None) and c.address._p_oid.hex() for c in customers],
         "customers": [c._p_oid.hex() for c in customers]})
    db.close()
"""

STORE_SHARED = """
    from shop import Address, Customer
    db = amberdb.DB(sys.argv[1], allowed_modules=["shop"])
    conn = db.open()
    shared = Address("1 Shared Rd", "both")
    conn.root()["customers"] = amberdb.PersistentList([Customer("a", shared), Customer("b", shared),
                                                        Customer("c", Address("2 Own Rd", "own"))])
    transaction.commit()
    out(shared._p_oid.hex())
    db.close()
"""

MAKE_PLAIN = """
    from amberdb import evolve
    import shop
    db = amberdb.DB(sys.argv[1], allowed_modules=["shop"])
    tid = db.last_tid()
    try:
        result = {"rewritten": evolve.make_plain(db, "shop.Address")}
    except evolve.SharedInstancesError as exc:
        result = {"refused": {"oids": [oid.hex() for oid in exc.oids], "message": str(exc)}}
    result["unchanged"] = db.last_tid() == tid
    db.close()
    out(result)
"""

READ_PLAIN = """
    import shop
    db = amberdb.DB(sys.argv[1], allowed_modules=["shop"])
    customers = db.open().root()["customers"]
    out([[c.name, type(c.address) is shop.Address, isinstance(c.address, amberdb.Persistent),
          c.address.street, c.address.city] for c in customers])
    db.close()
"""

PERSISTENT_AGAIN = """
    import shop
    db = amberdb.DB(sys.argv[1], allowed_modules=["shop"])
    customers = db.open().root()["customers"]
    loaded = [[type(c.address) is shop.Address, isinstance(c.address, amberdb.Persistent), c.address.city]
              for c in customers]
    first = customers[0]
    first.address.city = "moved"
    transaction.commit()
    transaction.begin()
    out({"loaded": loaded, "address": first.address._p_oid.hex(), "customer": first._p_oid.hex(),
         "others": [c.address._p_oid is None for c in customers[1:]]})
    db.close()
"""

READ_AGAIN = """
    import shop
    db = amberdb.DB(sys.argv[1], allowed_modules=["shop"])
    customers = db.open().root()["customers"]
    out([[c.address.street, c.address.city] for c in customers])
    db.close()
"""


def _current_headers(path: Path) -> dict[str, tuple[str, list[tuple[str, str]]]]:
    with amberdb.DB(amberdb.FileStorage(str(path), read_only=True), read_only=True) as db:
        return {
            oid.hex(): (header.class_name, [(ref.hex(), name) for ref, name in header.refs])
            for oid, _tid, record in iter_current_records(db.storage)
            for header in [decode_header(record)]
        }


def _becomes_persistent_again(procs: Processes, modules: Path, path: Path, customers: list[str]) -> list[str]:
    """Make Address persistent; its inline values load as persistent objects, and the one
    changed becomes its own record, referred to by its customer.  The new address oids."""
    write_module(modules, "shop", SHOP_PERSISTENT)
    again = run_child(procs, modules, PERSISTENT_AGAIN, path)
    assert again["loaded"] == [[True, True, f"city{n}"] for n in range(3)]
    assert again["customer"] == customers[0]
    assert again["others"] == [True, True]  # unchanged ones stay inline
    headers = _current_headers(path)
    assert headers[again["address"]][0] == "shop:Address"
    assert (again["address"], "shop:Address") in headers[again["customer"]][1]
    expected = [["0 Main St", "moved"], ["1 Main St", "city1"], ["2 Main St", "city2"]]
    assert run_child(procs, modules, READ_AGAIN, path) == expected
    return [again["address"]]


def test_make_plain_and_persistent_again(tmp_path: Path, procs: Processes) -> None:
    modules = tmp_path / "modules"
    modules.mkdir()
    path = tmp_path / "data.fs"
    write_module(modules, "shop", SHOP_PERSISTENT)
    stored = run_child(procs, modules, STORE, path)

    write_module(modules, "shop", SHOP_PLAIN)
    made = run_child(procs, modules, MAKE_PLAIN, path)
    assert made == {"rewritten": 3, "unchanged": False}

    expected = [[f"c{n}", True, False, f"{n} Main St", f"city{n}"] for n in range(3)]
    assert run_child(procs, modules, READ_PLAIN, path) == expected
    headers = _current_headers(path)
    for customer in stored["customers"]:
        class_name, refs = headers[customer]
        assert class_name == "shop:Customer"
        assert not {ref for ref, _ in refs} & set(stored["addresses"])
        assert all(name != "shop:Address" for _, name in refs)

    new = _becomes_persistent_again(procs, modules, path, stored["customers"])
    assert not set(new) & set(stored["addresses"])  # a new record, not the old one


def test_make_plain_refuses_shared_instances_and_changes_nothing(tmp_path: Path, procs: Processes) -> None:
    modules = tmp_path / "modules"
    modules.mkdir()
    path = tmp_path / "shared.fs"
    write_module(modules, "shop", SHOP_PERSISTENT)
    shared = run_child(procs, modules, STORE_SHARED, path)
    write_module(modules, "shop", SHOP_PLAIN)
    made = run_child(procs, modules, MAKE_PLAIN, path)
    assert made["refused"]["oids"] == [shared]
    assert hex(int(shared, 16)) in made["refused"]["message"]
    assert made["unchanged"] is True


def test_inline_instances_of_a_class_that_became_persistent(tmp_path: Path, procs: Processes) -> None:
    modules = tmp_path / "modules"
    modules.mkdir()
    path = tmp_path / "data.fs"
    write_module(modules, "shop", SHOP_PLAIN)  # Address plain from the start: stored inline
    stored = run_child(procs, modules, STORE, path)
    assert stored["addresses"] == [None, None, None]
    _becomes_persistent_again(procs, modules, path, stored["customers"])
