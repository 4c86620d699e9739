"""Leasing's SQL: seat pools, leases, the queue, replicas, requirements, and the lease
events announced to the other replicas. Implements ``domain.ports.LeaseQueries``.

Seat counts change only through conditional UPDATEs on the pool row, never by reading
a count into Python and writing it back.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import replace

from sqlalchemy import (
    ColumnElement,
    Integer,
    RowMapping,
    Update,
    and_,
    bindparam,
    delete,
    exists,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from services.license_server.domain.model import (
    Lease,
    LeaseEvent,
    NewLease,
    PoolInformation,
    Waiter,
)
from services.license_server.store.notifications import NOTIFY_CHANNEL, encode_event
from services.license_server.store.tables import (
    lease_queue,
    leases,
    pools,
    replicas,
    requirements,
)
from tessera.storage import first_row

# The statements every checkout and check-in batch runs, built once with bound parameters
# instead of per batch (expressions, coercions, the compiled cache's key): a batch of 15
# checkouts and 15 check-ins takes a quarter less CPU (docs/performance.md). The
# parameters are named b_*: an UPDATE reserves its columns' own names.


def _live(now: object) -> ColumnElement[bool]:
    """Whether a lease_queue row is a live waiter at ``now``: its stream kept it alive and
    its replica has not been declared dead (a row from before replicas were recorded has
    no replica and is judged by alive_until alone)."""
    return and_(
        lease_queue.c.alive_until > now,
        or_(
            lease_queue.c.replica_id.is_(None),
            exists().where(replicas.c.replica_id == lease_queue.c.replica_id),
        ),
    )


def _taking(ahead_of_ticket: bool) -> Update:
    ahead = select(lease_queue.c.waiter_id).where(
        lease_queue.c.feature == bindparam("b_feature"),
        _live(bindparam("b_now")),
    )
    if ahead_of_ticket:
        ahead = ahead.where(lease_queue.c.ticket < bindparam("b_ticket"))
    return (
        update(pools)
        .where(
            pools.c.feature == bindparam("b_feature"),
            # Written as a difference so a huge count cannot overflow the column type.
            bindparam("b_count", type_=Integer) <= pools.c.activated - pools.c.used,
            ~exists(ahead),
        )
        .values(used=pools.c.used + bindparam("b_count", type_=Integer))
    )


_TAKE_SEATS = _taking(ahead_of_ticket=False)
_TAKE_SEATS_AHEAD_OF_TICKET = _taking(ahead_of_ticket=True)
_GIVE_BACK_SEATS = (
    update(pools)
    .where(pools.c.feature == bindparam("b_feature"))
    .values(used=pools.c.used - bindparam("b_count", type_=Integer))
)
_RELEASE_LEASES = (
    update(leases)
    .where(
        leases.c.lease_id.in_(bindparam("b_lease_ids", expanding=True)),
        leases.c.secret_hash.in_(bindparam("b_hashes", expanding=True)),
        leases.c.released_at.is_(None),
    )
    .values(released_at=bindparam("b_now"), release_reason=bindparam("b_reason"))
    .returning(leases.c.lease_id, leases.c.secret_hash, leases.c.feature, leases.c.count)
)
# A stream's check-in, fenced by its epoch.
_RELEASE_LEASES_OF_EPOCH = _RELEASE_LEASES.where(leases.c.epoch == bindparam("b_epoch"))
_INSERT_LEASES = insert(leases)
_ANNOUNCE = text("SELECT pg_notify(:channel, p) FROM unnest(CAST(:payloads AS text[])) AS p")


class SqlLeaseQueries:
    """Leasing's queries within one transaction (``session``'s). ``origin`` names this
    process in the lease events it announces, so it can ignore its own when they come
    back over NOTIFY."""

    def __init__(self, session: AsyncSession, origin: str = "") -> None:
        self.session = session
        self.origin = origin
        self._dialect = session.get_bind().dialect.name

    # Pools

    async def take_seats(
        self,
        feature: str,
        count: int,
        now: dt.datetime,
        ticket: int | None = None,
    ) -> bool:
        """Take ``count`` seats if that many are free and nobody waits ahead, in one
        conditional statement. ``ticket`` is a queued caller's place in line; a caller
        that did not queue goes behind every live waiter."""
        parameters: dict[str, object] = {"b_feature": feature, "b_count": count, "b_now": now}
        if ticket is None:
            result = await self.session.execute(_TAKE_SEATS, parameters)
        else:
            parameters["b_ticket"] = ticket
            result = await self.session.execute(_TAKE_SEATS_AHEAD_OF_TICKET, parameters)
        return bool(result.rowcount == 1)  # type: ignore[attr-defined]

    async def give_back_seats(self, seats: Counter[str]) -> None:
        for feature, count in sorted(seats.items()):  # rows in one order: no deadlocks
            await self.session.execute(_GIVE_BACK_SEATS, {"b_feature": feature, "b_count": count})

    async def get_pool(self, feature: str) -> PoolInformation | None:
        row = await first_row(self.session, select(pools).where(pools.c.feature == feature))
        return (
            None if row is None else PoolInformation(row["feature"], row["activated"], row["used"])
        )

    async def list_pools(self) -> list[PoolInformation]:
        rows = (await self.session.execute(select(pools).order_by(pools.c.feature))).mappings()
        return [PoolInformation(row["feature"], row["activated"], row["used"]) for row in rows]

    async def pools_with_queues(self, now: dt.datetime) -> list[PoolInformation]:
        """Every pool with the number of live waiters for it, in one statement (for a
        metrics scrape, which must stay cheap)."""
        waiting = (
            select(func.count())
            .select_from(lease_queue)
            .where(lease_queue.c.feature == pools.c.feature, _live(now))
            .scalar_subquery()
        )
        rows = await self.session.execute(
            select(pools.c.feature, pools.c.activated, pools.c.used, waiting).order_by(
                pools.c.feature
            )
        )
        return [
            PoolInformation(feature, activated, used, queued=int(queued))
            for feature, activated, used, queued in rows.all()
        ]

    async def lock_pool(self, feature: str) -> PoolInformation:
        """The pool row of a feature (created empty when missing), locked until commit, so
        recounts of one pool take turns and each sums what the one before it wrote."""
        upsert = postgresql.insert(pools) if self._dialect == "postgresql" else sqlite.insert(pools)
        await self.session.execute(
            upsert.values(feature=feature, activated=0, used=0).on_conflict_do_nothing()
        )
        row = await first_row(
            self.session, select(pools).where(pools.c.feature == feature).with_for_update()
        )
        assert row is not None
        return PoolInformation(row["feature"], row["activated"], row["used"])

    async def set_pool_activated(self, feature: str, activated: int) -> bool:
        """Set a pool's activated seats, unless more are in use than that (one statement)."""
        result = await self.session.execute(
            update(pools)
            .where(pools.c.feature == feature, pools.c.used <= activated)
            .values(activated=activated)
        )
        return bool(result.rowcount == 1)  # type: ignore[attr-defined]

    # Leases

    async def insert_leases(self, granted: Sequence[tuple[Lease, bytes]]) -> None:
        """Insert many new leases (each with its secret's hash) in one statement."""
        await self.session.execute(
            _INSERT_LEASES,
            [
                {
                    "lease_id": lease.lease_id,
                    "secret_hash": hashed,
                    "feature": lease.feature,
                    "count": lease.count,
                    "client_host": lease.client_host,
                    "user": lease.user,
                    "display_name": lease.display_name,
                    "ttl_seconds": lease.ttl_seconds,
                    "epoch": lease.epoch,
                    "granted_at": lease.granted_at,
                    "last_heartbeat_at": lease.last_heartbeat_at,
                    "expires_at": lease.expires_at,
                    "released_at": None,
                }
                for lease, hashed in granted
            ],
        )

    async def release_leases(
        self,
        credentials: Iterable[tuple[str, bytes]],
        now: dt.datetime,
        reason: str,
        epoch: int | None = None,
    ) -> dict[tuple[str, bytes], str]:
        """Release the held leases (of ``epoch``, when given) among (lease id, secret
        hash) pairs and give their seats back; the feature of each pair released. One
        UPDATE finds the rows by the ids (the primary key) and the hashes; the rare row
        whose id and hash came from two different pairs is put back, as nobody asked for
        it with its own secret."""
        asked = set(credentials)
        parameters: dict[str, object] = {
            "b_lease_ids": list({lease_id for lease_id, _ in asked}),
            "b_hashes": list({hashed for _, hashed in asked}),
            "b_now": now,
            "b_reason": reason,
        }
        if epoch is None:
            rows = (await self.session.execute(_RELEASE_LEASES, parameters)).all()
        else:
            parameters["b_epoch"] = epoch
            rows = (await self.session.execute(_RELEASE_LEASES_OF_EPOCH, parameters)).all()
        released: dict[tuple[str, bytes], str] = {}
        crossed: list[str] = []
        seats: Counter[str] = Counter()
        for lease_id, hashed, feature, count in rows:
            if (lease_id, bytes(hashed)) in asked:
                released[(lease_id, bytes(hashed))] = feature
                seats[feature] += count
            else:
                crossed.append(lease_id)
        if crossed:
            await self.session.execute(
                update(leases)
                .where(leases.c.lease_id.in_(crossed))
                .values(released_at=None, release_reason=None)
            )
        await self.give_back_seats(seats)
        return released

    async def release_lease(
        self,
        lease_id: str,
        secret_hash: bytes,
        now: dt.datetime,
        reason: str,
        epoch: int | None = None,
    ) -> str | None:
        """Release a held lease (of ``epoch``, when given) and give its seats back; its
        feature, or None if no such lease was held (``release_leases`` of one)."""
        released = await self.release_leases([(lease_id, secret_hash)], now, reason, epoch)
        return released.get((lease_id, secret_hash))

    async def get_lease(self, lease_id: str, secret_hash: bytes) -> Lease | None:
        row = await first_row(
            self.session,
            select(leases).where(
                leases.c.lease_id == lease_id, leases.c.secret_hash == secret_hash
            ),
        )
        return None if row is None else _lease(row)

    async def extend_lease(
        self,
        lease_id: str,
        secret_hash: bytes,
        epoch: int | None,
        now: dt.datetime,
        ttl_seconds: int | None = None,
    ) -> dt.datetime | None:
        """Push a held, unexpired lease's expiry to now + its TTL; None if it is not one.

        A caller that knows the lease's TTL (a stream) extends it in one statement;
        otherwise the TTL is read first, and the same statement extends the lease if it
        is still one to extend.
        """
        conditions = [
            leases.c.lease_id == lease_id,
            leases.c.secret_hash == secret_hash,
            leases.c.released_at.is_(None),
            leases.c.expires_at > now,
        ]
        if epoch is not None:
            conditions.append(leases.c.epoch == epoch)
        if ttl_seconds is None:
            ttl_seconds = await self.session.scalar(select(leases.c.ttl_seconds).where(*conditions))
            if ttl_seconds is None:
                return None
        expires_at = now + dt.timedelta(seconds=ttl_seconds)
        result = await self.session.execute(
            update(leases)
            .where(*conditions, leases.c.ttl_seconds == ttl_seconds)
            .values(last_heartbeat_at=now, expires_at=expires_at)
        )
        return expires_at if result.rowcount == 1 else None  # type: ignore[attr-defined]

    async def extend_leases(
        self, lease_ids: list[str], now: dt.datetime, ttl_seconds: int
    ) -> dict[str, int]:
        """Extend many held leases of one TTL in one statement; the epoch of each id still
        held."""
        rows = await self.session.execute(
            update(leases)
            .where(leases.c.lease_id.in_(lease_ids), leases.c.released_at.is_(None))
            .values(last_heartbeat_at=now, expires_at=now + dt.timedelta(seconds=ttl_seconds))
            .returning(leases.c.lease_id, leases.c.epoch)
        )
        return {lease_id: epoch for lease_id, epoch in rows.all()}

    async def shorten_stretched_leases(
        self, now: dt.datetime, tolerance: dt.timedelta
    ) -> list[str]:
        """Cut every held lease that expires more than ``tolerance`` beyond one TTL from
        ``now`` (granted or extended while the clock was ahead) back to now + its TTL;
        the ids of those cut. One UPDATE per TTL, each on the expiry index."""
        ttls = (
            await self.session.execute(
                select(leases.c.ttl_seconds).where(leases.c.released_at.is_(None)).distinct()
            )
        ).scalars()
        shortened: list[str] = []
        for ttl in list(ttls):
            expires_at = now + dt.timedelta(seconds=ttl)
            rows = await self.session.execute(
                update(leases)
                .where(
                    leases.c.released_at.is_(None),
                    leases.c.ttl_seconds == ttl,
                    leases.c.expires_at > expires_at + tolerance,
                )
                .values(expires_at=expires_at)
                .returning(leases.c.lease_id)
            )
            shortened += rows.scalars()
        return shortened

    async def bump_epochs(
        self, credentials: Iterable[tuple[str, bytes]], now: dt.datetime
    ) -> dict[tuple[str, bytes], Lease]:
        """``bump_epoch`` for many (lease id, secret hash) pairs: one UPDATE fences and
        extends the held, unexpired ones (an OR of exact pairs, on the primary key),
        one more per TTL among them sets their expiry; each pair's lease as it is now."""
        pairs = [
            and_(leases.c.lease_id == lease_id, leases.c.secret_hash == hashed)
            for lease_id, hashed in dict.fromkeys(credentials)
        ]
        rows = (
            await self.session.execute(
                update(leases)
                .where(or_(*pairs), leases.c.released_at.is_(None), leases.c.expires_at > now)
                .values(epoch=leases.c.epoch + 1, last_heartbeat_at=now)
                .returning(*leases.c)
            )
        ).mappings()
        bumped: dict[tuple[str, bytes], Lease] = {}
        by_ttl: defaultdict[int, list[str]] = defaultdict(list)
        for row in rows:
            lease = _lease(row)
            expires_at = now + dt.timedelta(seconds=lease.ttl_seconds)
            bumped[(lease.lease_id, bytes(row["secret_hash"]))] = replace(
                lease, expires_at=expires_at
            )
            by_ttl[lease.ttl_seconds].append(lease.lease_id)
        for ttl, lease_ids in by_ttl.items():
            await self.session.execute(
                update(leases)
                .where(leases.c.lease_id.in_(lease_ids))
                .values(expires_at=now + dt.timedelta(seconds=ttl))
            )
        return bumped

    async def bump_epoch(self, lease_id: str, secret_hash: bytes, now: dt.datetime) -> Lease | None:
        """Fence out older streams of a held, unexpired lease and extend it (resume):
        ``bump_epochs`` of one."""
        bumped = await self.bump_epochs([(lease_id, secret_hash)], now)
        return bumped.get((lease_id, secret_hash))

    async def release_expired(self, now: dt.datetime, limit: int) -> list[tuple[str, str]]:
        """Release up to ``limit`` leases whose TTL ran out; (lease id, feature) of each."""
        expired = (
            select(leases.c.lease_id)
            .where(leases.c.released_at.is_(None), leases.c.expires_at <= now)
            .limit(limit)
        )
        if self._dialect == "postgresql":
            expired = expired.with_for_update(skip_locked=True)
        rows = (
            await self.session.execute(
                update(leases)
                .where(
                    leases.c.lease_id.in_(expired.scalar_subquery()),
                    leases.c.released_at.is_(None),
                )
                .values(released_at=now, release_reason="expired")
                .returning(leases.c.lease_id, leases.c.feature, leases.c.count)
            )
        ).all()
        seats: Counter[str] = Counter()
        for _, feature, count in rows:
            seats[feature] += count
        await self.give_back_seats(seats)
        return [(lease_id, feature) for lease_id, feature, _ in rows]

    async def revoke_lease(self, lease_id: str, now: dt.datetime, reason: str) -> Lease | None:
        """Release a held lease without its secret (operator, expiry of its license)."""
        row = await first_row(
            self.session,
            update(leases)
            .where(leases.c.lease_id == lease_id, leases.c.released_at.is_(None))
            .values(released_at=now, release_reason=reason)
            .returning(*leases.c),
        )
        if row is None:
            return None
        lease = _lease(row)
        await self.give_back_seats(Counter({lease.feature: lease.count}))
        return lease

    async def lease_exists(self, lease_id: str) -> bool:
        found = await self.session.scalar(
            select(leases.c.lease_id).where(leases.c.lease_id == lease_id)
        )
        return found is not None

    async def list_held_leases(self, feature: str) -> list[Lease]:
        query = select(leases).where(leases.c.released_at.is_(None)).order_by(leases.c.granted_at)
        if feature:
            query = query.where(leases.c.feature == feature)
        return [_lease(row) for row in (await self.session.execute(query)).mappings()]

    async def newest_held_leases(self, feature: str, limit: int) -> list[Lease]:
        rows = (
            await self.session.execute(
                select(leases)
                .where(leases.c.feature == feature, leases.c.released_at.is_(None))
                .order_by(leases.c.granted_at.desc())
                .limit(limit)
            )
        ).mappings()
        return [_lease(row) for row in rows]

    # The queue

    async def enqueue(self, waiter: Waiter, alive_until: dt.datetime, replica_id: str) -> int:
        """Put a waiter in line, served by replica ``replica_id``; returns its ticket."""
        ticket = await self.session.scalar(
            insert(lease_queue)
            .values(
                waiter_id=waiter.waiter_id,
                feature=waiter.request.feature,
                count=waiter.request.count,
                client_host=waiter.request.client_host,
                user=waiter.request.user,
                display_name=waiter.request.display_name,
                enqueued_at=waiter.enqueued_at,
                alive_until=alive_until,
                replica_id=replica_id,
            )
            .returning(lease_queue.c.ticket)
        )
        assert ticket is not None
        return int(ticket)

    async def leave_queue(self, waiter_id: str) -> None:
        await self.session.execute(delete(lease_queue).where(lease_queue.c.waiter_id == waiter_id))

    async def claim_waiter(self, waiter_id: str, now: dt.datetime) -> bool:
        """Take a live waiter out of line to grant it; False when it is no longer live
        (its replica was declared dead, or it was dropped). On PostgreSQL the DELETE
        waits for a replica dropping the row at the same time and then finds it gone, so
        a waiter is granted or dropped, never both."""
        result = await self.session.execute(
            delete(lease_queue).where(lease_queue.c.waiter_id == waiter_id, _live(now))
        )
        return bool(result.rowcount == 1)  # type: ignore[attr-defined]

    async def keep_waiter_alive(
        self, waiter_id: str, alive_until: dt.datetime, now: dt.datetime
    ) -> bool:
        """Push a live waiter's alive_until on; False when it is no longer live."""
        result = await self.session.execute(
            update(lease_queue)
            .where(lease_queue.c.waiter_id == waiter_id, _live(now))
            .values(alive_until=alive_until)
        )
        return bool(result.rowcount == 1)  # type: ignore[attr-defined]

    async def queue_position(self, waiter: Waiter, now: dt.datetime) -> int:
        """1 + the live waiters ahead of ``waiter`` for its feature."""
        ahead = await self.session.scalar(
            select(func.count())
            .select_from(lease_queue)
            .where(
                lease_queue.c.feature == waiter.request.feature,
                _live(now),
                lease_queue.c.ticket < waiter.ticket,
            )
        )
        return int(ahead or 0) + 1

    async def list_waiters(self, feature: str, now: dt.datetime) -> list[Waiter]:
        query = select(lease_queue).where(_live(now)).order_by(lease_queue.c.ticket)
        if feature:
            query = query.where(lease_queue.c.feature == feature)
        return [
            Waiter(
                waiter_id=row["waiter_id"],
                request=NewLease(
                    feature=row["feature"],
                    count=row["count"],
                    client_host=row["client_host"],
                    user=row["user"],
                    display_name=row["display_name"],
                ),
                enqueued_at=row["enqueued_at"],
                ticket=row["ticket"],
                replica_id=row["replica_id"] or "",
            )
            for row in (await self.session.execute(query)).mappings()
        ]

    async def drop_dead_waiters(self, now: dt.datetime) -> int:
        """Delete the rows of waiters no longer live (their streams stopped keeping them
        alive, or their replica was declared dead)."""
        result = await self.session.execute(delete(lease_queue).where(~_live(now)))
        return int(result.rowcount)  # type: ignore[attr-defined]

    async def queued_per_feature(self, now: dt.datetime) -> dict[str, int]:
        rows = await self.session.execute(
            select(lease_queue.c.feature, func.count())
            .where(_live(now))
            .group_by(lease_queue.c.feature)
        )
        return {feature: int(count) for feature, count in rows.all()}

    # Replicas

    async def register_replica(self, replica_id: str, now: dt.datetime) -> None:
        await self.session.execute(
            insert(replicas).values(replica_id=replica_id, beat=0, started_at=now)
        )

    async def beat_replica(self, replica_id: str) -> bool:
        """Raise a replica's beat; False when its row is gone (it was declared dead)."""
        result = await self.session.execute(
            update(replicas)
            .where(replicas.c.replica_id == replica_id)
            .values(beat=replicas.c.beat + 1)
        )
        return bool(result.rowcount == 1)  # type: ignore[attr-defined]

    async def hold_replica(self, replica_id: str) -> bool:
        """Whether a replica's row exists, kept until commit: on PostgreSQL a replica
        declaring it dead waits (FOR KEY SHARE; its beats do not), so a waiter queued in
        this transaction is dropped with the others, never left behind."""
        found = await self.session.scalar(
            select(replicas.c.replica_id)
            .where(replicas.c.replica_id == replica_id)
            .with_for_update(read=True, key_share=True)
        )
        return found is not None

    async def replica_beats(self) -> dict[str, int]:
        rows = await self.session.execute(select(replicas.c.replica_id, replicas.c.beat))
        return {replica_id: int(beat) for replica_id, beat in rows.all()}

    async def drop_replica(self, replica_id: str, beat: int | None = None) -> list[str] | None:
        """Declare a replica dead: delete its row (only while its beat is still ``beat``,
        when given) and its waiters; the features they waited for (with repeats), or None
        when the row was gone or had beaten again."""
        condition = [replicas.c.replica_id == replica_id]
        if beat is not None:
            condition.append(replicas.c.beat == beat)
        result = await self.session.execute(delete(replicas).where(*condition))
        if result.rowcount != 1:  # type: ignore[attr-defined]
            return None
        rows = await self.session.execute(
            delete(lease_queue)
            .where(lease_queue.c.replica_id == replica_id)
            .returning(lease_queue.c.feature)
        )
        return list(rows.scalars())

    async def drop_other_replicas(self, replica_id: str) -> list[str]:
        """Declare every replica but ``replica_id`` dead (a database only one process
        serves, at that process's start); the features their waiters waited for."""
        await self.session.execute(delete(replicas).where(replicas.c.replica_id != replica_id))
        rows = await self.session.execute(
            delete(lease_queue)
            .where(or_(lease_queue.c.replica_id.is_(None), lease_queue.c.replica_id != replica_id))
            .returning(lease_queue.c.feature)
        )
        return list(rows.scalars())

    # Requirements

    async def declare_requirement(
        self, client_host: str, feature: str, required: int, now: dt.datetime
    ) -> None:
        await self.session.execute(
            delete(requirements).where(
                requirements.c.client_host == client_host, requirements.c.feature == feature
            )
        )
        if required > 0:
            await self.session.execute(
                insert(requirements).values(
                    client_host=client_host, feature=feature, required=required, declared_at=now
                )
            )

    async def required_per_feature(self) -> dict[str, int]:
        rows = await self.session.execute(
            select(requirements.c.feature, func.sum(requirements.c.required)).group_by(
                requirements.c.feature
            )
        )
        return {feature: int(total) for feature, total in rows.all()}

    # Lease events for the other replicas (PostgreSQL NOTIFY, delivered at commit)

    async def announce(self, event: LeaseEvent) -> None:
        """Tell other replicas over PostgreSQL NOTIFY, delivered when this commits
        (``announce_all`` of one)."""
        await self.announce_all((event,))

    async def announce_all(self, events: Sequence[LeaseEvent]) -> None:
        """Tell other replicas of many events, in one statement."""
        if self._dialect == "postgresql" and events:
            await self.session.execute(
                _ANNOUNCE,
                {
                    "channel": NOTIFY_CHANNEL,
                    "payloads": [encode_event(event, self.origin) for event in events],
                },
            )


def _lease(row: RowMapping) -> Lease:
    return Lease(
        lease_id=row["lease_id"],
        feature=row["feature"],
        count=row["count"],
        client_host=row["client_host"],
        user=row["user"],
        display_name=row["display_name"],
        ttl_seconds=row["ttl_seconds"],
        epoch=row["epoch"],
        granted_at=row["granted_at"],
        last_heartbeat_at=row["last_heartbeat_at"],
        expires_at=row["expires_at"],
        released_at=row["released_at"],
        release_reason=row["release_reason"],
    )
