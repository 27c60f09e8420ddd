"""lender.frees.Frees: memory goes back as each FREE arrives, and a confirmation in
flight never holds a release up."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from harvestd.errors import Unavailable
from lender.frees import Frees

LOG = logging.LoggerAdapter(logging.getLogger(__name__), {})


class Books:
    """A lender's allocations and the broker's confirmations, as the callables see them."""

    def __init__(self, leases: list[str]) -> None:
        self.allocations: dict[str, object] = {lease: object() for lease in leases}
        self.released: list[str] = []
        self.confirmed: list[list[str]] = []
        self.confirm_gate = threading.Event()
        self.first_confirm_started = threading.Event()
        self.fail_confirms = 0
        self._lock = threading.Lock()
        self._names = {id(a): lease for lease, a in self.allocations.items()}

    def take(self, lease_id: str) -> object | None:
        with self._lock:
            return self.allocations.pop(lease_id, None)

    def give_back(self, alloc: object, clean: bool) -> None:
        with self._lock:
            self.released.append(self._names[id(alloc)])

    def confirm(self, lease_ids: list[str]) -> None:
        self.first_confirm_started.set()
        if self.fail_confirms:
            self.fail_confirms -= 1
            raise Unavailable("broker away")
        assert self.confirm_gate.wait(10)
        with self._lock:
            self.confirmed.append(list(lease_ids))

    def all_confirmed(self) -> set[str]:
        with self._lock:
            return {lease for batch in self.confirmed for lease in batch}


def _until(check, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


@pytest.fixture
def running():
    stop = threading.Event()
    made: list[Frees] = []

    def start(books: Books) -> Frees:
        frees = Frees(books.take, books.give_back, books.confirm, stop, LOG, threads=2)  # type: ignore[arg-type]
        for thread in frees.threads:
            thread.start()
        made.append(frees)
        return frees

    yield start
    stop.set()
    for frees in made:
        frees.close()
        for thread in frees.threads:
            thread.join(5)


def test_a_release_does_not_wait_for_the_confirmation_in_flight(running) -> None:
    books = Books(["a", "b", "c"])
    frees = running(books)
    frees.put("a", True)
    assert books.first_confirm_started.wait(10)  # a's confirmation is in flight, held
    frees.put("b", True)
    frees.put("c", False)
    _until(lambda: sorted(books.released) == ["a", "b", "c"])
    assert books.confirmed == []  # released while the first confirmation still waits
    books.confirm_gate.set()
    _until(lambda: books.all_confirmed() == {"a", "b", "c"})
    assert books.confirmed[0] == ["a"]  # the rest went in a later batch


def test_an_end_with_no_allocation_here_is_confirmed_without_a_release(running) -> None:
    books = Books(["a"])
    books.confirm_gate.set()
    frees = running(books)
    frees.put("never-picked-up", True)
    frees.put("a", True)
    _until(lambda: books.all_confirmed() == {"never-picked-up", "a"})
    assert books.released == ["a"]


def test_a_failed_confirmation_is_logged_and_the_next_ones_still_go(running, caplog) -> None:
    books = Books(["a", "b"])
    books.fail_confirms = 1
    books.confirm_gate.set()
    frees = running(books)
    with caplog.at_level(logging.INFO, logger=__name__):
        frees.put("a", True)
        _until(lambda: "confirming 1 frees failed" in caplog.text)
        frees.put("b", True)
        _until(lambda: books.all_confirmed() == {"b"})
    assert books.released == ["a", "b"]
