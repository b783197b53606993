"""Which replica leads: a lease row in the job store's database, with a fencing token.

Every replica serves the API; only the lease's holder reconciles (starts, follows and finishes
jobs in Ray). The holder renews the lease every ``renew_s``; when it stops (killed, paused, cut
off from the database) the lease ends ``ttl_s`` after its last renewal and the next replica to
ask takes it, with a token one higher.

Why a lease and not a Postgres advisory lock: a session lock belongs to a connection, and a
paused replica (SIGSTOP, a frozen VM, a long stall) keeps its connection, and so the lock, for
as long as it is paused: nobody would take over. A lease ends by itself. It also works on
SQLite, where two processes on one file share the row. Its time is the database's clock, so
replicas on hosts whose clocks differ agree on when it ends.

Fencing: every write of the reconciler carries the lease it held when it read (a
:class:`~service.store.Fence`) and is made only if that lease is still the database's and
unexpired, in the same transaction (see :meth:`service.store.JobStore.move`). A former leader that
wakes after its lease passed on therefore changes nothing; its Ray submissions are harmless too,
since a submission id is deterministic per attempt and Ray refuses a second one.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from pathlib import Path

from sqlalchemy import case, insert, or_, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from service.store import LEASES, Fence, JobStore, database_now

log = logging.getLogger("hutch.leader")

RECONCILER_LEASE = "reconciler"


def _process_key() -> str:
    """What names this process among every process that may share the database: the kernel's boot
    and pid namespace with the pid, so a replica on the same machine can tell whether a holder is
    still running (:func:`_gone`)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:  # not Linux: never judged gone, the lease just expires
        return f"{os.getpid()}@-"
    return f"{os.getpid()}@{boot}.{namespace}"


def _gone(holder: str | None) -> bool:
    """Whether ``holder`` is a process of this machine and pid namespace that has ended (killed,
    crashed): its successor takes over at once rather than after ``ttl_s``. A reused pid reads as
    alive, which only means waiting for the lease to expire."""
    if not holder or holder.count("/") < 2:
        return False
    pid, _, where = holder.rsplit("/", 2)[1].partition("@")
    mine = _process_key().partition("@")[2]
    if where != mine or mine == "-":
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (OSError, ValueError):
        return False
    return False


class Lease:
    """The reconciler's lease, kept by a daemon thread; :meth:`current` says whether this replica
    leads now, and with which :class:`Fence`."""

    def __init__(
        self,
        store: JobStore,
        replica: str | None = None,
        ttl_s: float = 10.0,
        renew_s: float | None = None,
        name: str = RECONCILER_LEASE,
    ) -> None:
        self.store = store
        self.name = name
        self.replica = replica or socket.gethostname()
        # replica/pid@machine/nonce: unique per process, readable in /readyz as its first part.
        self.holder = f"{self.replica}/{_process_key()}/{secrets.token_hex(3)}"
        self.ttl_s = ttl_s
        self.renew_s = renew_s if renew_s is not None else ttl_s / 5
        self.handovers = 0  # times this replica took the lease from another holder (or none)
        self._fence: Fence | None = None
        self._valid_until = 0.0  # monotonic: past it, this replica no longer counts on its lease
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- state -----------------------------------------------------------------------------
    def current(self) -> Fence | None:
        """The lease this replica holds now, or None. It is counted as lost a little before the
        database ends it (the renewal's start plus ``ttl_s``, less one renewal period), so this
        replica stops acting first; the fence covers the rest."""
        fence = self._fence
        return fence if fence is not None and time.monotonic() < self._valid_until else None

    def holder_now(self) -> str | None:
        """The replica that holds the lease as the database says (None if it has lapsed)."""
        with self.store.engine.connect() as connection:
            row = connection.execute(
                select(LEASES.c.holder).where(
                    LEASES.c.name == self.name, LEASES.c.expires_at > database_now(self.store.engine)
                )
            ).first()
        return replica_of(row[0]) if row is not None and row[0] else None

    # -- the thread ------------------------------------------------------------------------
    def start(self) -> None:
        self._ensure_row()
        self.renew()  # lead from the first tick when nobody else does
        self._thread = threading.Thread(target=self._loop, name="hutch-lease", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop renewing and give the lease up, so another replica takes it at once."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.renew_s + 10)
        if self._fence is not None:
            self._fence = None
            try:
                with self.store.engine.begin() as connection:
                    connection.execute(
                        update(LEASES)
                        .where(LEASES.c.name == self.name, LEASES.c.holder == self.holder)
                        .values(expires_at=0.0)
                    )
            except SQLAlchemyError as error:  # it expires by itself
                log.warning("could not give the lease up: %s", type(error).__name__)

    def _loop(self) -> None:
        while not self._stop.wait(self.renew_s):
            try:
                self.renew()
            except SQLAlchemyError as error:  # keep the lease until it lapses; ask again next period
                log.warning("lease %s not renewed: %s", self.name, type(error).__name__)

    def _ensure_row(self) -> None:
        try:
            with self.store.engine.begin() as connection:
                if connection.execute(select(LEASES.c.name).where(LEASES.c.name == self.name)).first():
                    return
                connection.execute(
                    insert(LEASES).values(name=self.name, holder=None, token=0, expires_at=0.0)
                )
        except IntegrityError:  # another replica inserted it first
            pass

    def renew(self) -> bool:
        """Take or extend the lease if it is ours, free, expired or its holder is gone; True if
        this replica leads now."""
        began = time.monotonic()
        engine = self.store.engine
        now = database_now(engine)
        ours = LEASES.c.holder == self.holder
        takeable = or_(ours, LEASES.c.holder.is_(None), LEASES.c.expires_at <= now)
        if self._fence is None:  # a holder of this machine that has died need not be waited for
            with engine.connect() as connection:
                query = select(LEASES.c.holder).where(LEASES.c.name == self.name)
                holder = connection.execute(query).scalar()
            if holder != self.holder and _gone(holder):
                takeable = or_(takeable, LEASES.c.holder == holder)
        with engine.begin() as connection:  # one statement: the update decides, whoever else asks
            token = connection.execute(
                update(LEASES)
                .where(LEASES.c.name == self.name, takeable)
                .values(
                    holder=self.holder,
                    token=case((ours, LEASES.c.token), else_=LEASES.c.token + 1),
                    expires_at=now + self.ttl_s,
                )
                .returning(LEASES.c.token)
            ).scalar()
        led = self._fence is not None
        if token is None:
            if led:
                log.error("lost the %s lease to %s", self.name, self.holder_now() or "nobody")
            self._fence = None
            return False
        self._valid_until = began + self.ttl_s - self.renew_s
        if self._fence is None or self._fence.token != token:
            self.handovers += 1
            log.warning("this replica (%s) now leads the %s, token %d", self.replica, self.name, token)
        self._fence = Fence(self.name, self.holder, int(token))
        return True


def replica_of(holder: str) -> str:
    """The replica's name in a holder string (``replica/pid@machine/nonce``)."""
    return holder.rsplit("/", 2)[0]
