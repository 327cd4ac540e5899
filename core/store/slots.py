"""Cluster slots and their queue (L12): at most N nodes of a cluster out of load balancing."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import bindparam, delete, exists, func, insert, literal, select, union_all, update
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from core.store import tables as t
from core.store.base import StoreBase, record_of, utcnow
from core.store.records import SlotFingerprint, SlotRecord, SlotRelease

CONTENDED = frozenset({"40001", "40P01"})
"""PostgreSQL's serialization failure and deadlock: another instance (or run) changed the
same slots at the same moment; the transaction is tried again."""


def _contended(exc: DBAPIError) -> bool:
    """Whether the transaction lost a race with another one over the same rows."""
    code = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
    return isinstance(exc, IntegrityError | OperationalError) or code in CONTENDED


_s, _w = t.cluster_slots, t.slot_waiters
_other = _s.alias("other")
_HELD = select(_s.c.slot, _s.c.node).where(_s.c.cluster == bindparam("cluster"))
_HELD_ROWS = select(_s).where(_s.c.cluster == bindparam("cluster")).order_by(_s.c.slot)
_FREE = delete(_s).where(_s.c.cluster == bindparam("cluster"), _s.c.node == bindparam("node"))
_QUEUE = select(_w.c.id, _w.c.node).where(_w.c.cluster == bindparam("cluster")).order_by(_w.c.id)
_JOIN = insert(_w).from_select(
    ["cluster", "node", "run_id", "queued_at"],
    select(
        bindparam("b_cluster", type_=_w.c.cluster.type),
        bindparam("b_node", type_=_w.c.node.type),
        bindparam("b_run", type_=_w.c.run_id.type),
        bindparam("b_at", type_=_w.c.queued_at.type),
    ).where(
        ~exists().where(_w.c.cluster == bindparam("b_cluster"), _w.c.node == bindparam("b_node"))
    ),
)
_DEQUEUE = delete(_w).where(_w.c.cluster == bindparam("cluster"), _w.c.node == bindparam("node"))
_HEAD = (
    delete(_w)
    .where(
        # the first place no other transaction is taking out right now (PostgreSQL;
        # SQLite has one writer): two slots freed at the same moment go to two nodes
        _w.c.id
        == select(_w.c.id)
        .where(_w.c.cluster == bindparam("cluster"), _w.c.node != bindparam("node"))
        .order_by(_w.c.id)
        .limit(1)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    .returning(_w.c.id, _w.c.node, _w.c.run_id, _w.c.queued_at)
)
_HAND_ON = (
    update(_s)
    .where(
        _s.c.cluster == bindparam("b_cluster"),
        _s.c.node == bindparam("b_node"),
        _s.c.slot < bindparam("b_limit"),
        ~exists().where(
            _other.c.cluster == bindparam("b_cluster"), _other.c.node == bindparam("b_to")
        ),
    )
    .values(
        node=bindparam("b_to"),
        run_id=bindparam("b_run"),
        owner=select(t.runs.c.owner).where(t.runs.c.id == bindparam("b_run")).scalar_subquery(),
        taken_at=bindparam("b_at", type_=_s.c.taken_at.type),
    )
    .returning(_s.c.slot)
)

HANDOVER_TRIES = 3
"""Tries of a hand-over that races with another transaction before the slot is just freed."""


class SlotsStore(StoreBase):
    """Cluster slots and their queue (L12): at most N nodes of a cluster out of load balancing."""

    async def try_take_slot(
        self,
        *,
        cluster: str,
        node: str,
        limit: int,
        run_id: int | None,
        owner: str | None = None,
        prefer: int = 0,
    ) -> int | None:
        """Take a free slot of the cluster for ``node``; ``None`` when all ``limit`` are held.

        A node that already holds a slot gets it back (idempotent after a restart). Slots
        are rows with a primary key (cluster, slot): two instances can never both insert
        the same one, so the limit holds across processes. ``prefer``: which of the free
        slots to try first (nodes taking slots at the same moment try different ones).
        """
        for _ in range(limit + 1):
            async with self.transaction() as conn:
                held = (await conn.execute(_HELD, {"cluster": cluster})).all()
                for row in held:
                    if row.node == node:
                        return int(row.slot)
                taken = {int(r.slot) for r in held}
                free = [s for s in range(limit) if s not in taken]
                if not free:
                    return None
                slot = free[min(prefer, len(free) - 1)]
                try:
                    await conn.execute(
                        insert(_s),
                        {
                            "cluster": cluster,
                            "slot": slot,
                            "node": node,
                            "run_id": run_id,
                            "owner": owner,
                            "taken_at": utcnow(),
                        },
                    )
                    await conn.execute(_DEQUEUE, {"cluster": cluster, "node": node})
                except DBAPIError as exc:
                    if not _contended(exc):
                        raise
                    await conn.rollback()
                    continue  # another instance or run took it first: look again
                return slot
        return None

    async def release_slot(
        self, *, cluster: str, node: str, limit: int | None = None
    ) -> SlotRelease:
        """Free ``node``'s slot of ``cluster``. With ``limit``, the slot goes straight to
        the head of the cluster's queue in one transaction of two statements (with nobody
        queued, the slot is then freed in a second one): the next node holds it without
        looking at the store. It is not handed on
        when its number is not below ``limit`` (the limit was lowered) or the head already
        holds a slot (taken before a restart); then the head keeps its place.
        """
        if limit is not None:
            for _ in range(HANDOVER_TRIES):
                try:
                    handed = await self._hand_over(cluster=cluster, node=node, limit=limit)
                except DBAPIError as exc:
                    if not _contended(exc):
                        raise
                    continue  # raced with a take or another hand-over: try again
                if handed is not None:
                    return handed
                break
        async with self.single_statement() as conn:
            result = await conn.execute(_FREE, {"cluster": cluster, "node": node})
        return SlotRelease(released=bool(result.rowcount))

    async def _hand_over(self, *, cluster: str, node: str, limit: int) -> SlotRelease | None:
        """Give ``node``'s slot to the head of the queue; ``None`` when there is none or the
        slot may not be handed on (then the head keeps its place)."""
        async with self.transaction() as conn:
            head = (await conn.execute(_HEAD, {"cluster": cluster, "node": node})).first()
            if head is None:
                return None
            handed = (
                await conn.execute(
                    _HAND_ON,
                    {
                        "b_cluster": cluster,
                        "b_node": node,
                        "b_limit": limit,
                        "b_to": head.node,
                        "b_run": head.run_id,
                        "b_at": utcnow(),
                    },
                )
            ).first()
            if handed is not None:
                return SlotRelease(
                    released=True, slot=int(handed.slot), to=str(head.node), place=int(head.id)
                )
            # not handed on: the head keeps its place (and the slot is freed by the caller)
            await conn.execute(
                insert(_w),
                {
                    "id": head.id,
                    "cluster": cluster,
                    "node": head.node,
                    "run_id": head.run_id,
                    "queued_at": head.queued_at,
                },
            )
        return None

    async def slots(self, cluster: str | None = None) -> list[SlotRecord]:
        query = select(t.cluster_slots).order_by(t.cluster_slots.c.cluster, t.cluster_slots.c.slot)
        if cluster is not None:
            query = query.where(t.cluster_slots.c.cluster == cluster)
        return await self._all(query, SlotRecord)

    async def wait_for_slot(self, *, cluster: str, node: str, run_id: int | None) -> None:
        """Join the cluster's queue (ordered by arrival) unless already in it (one
        statement)."""
        async with self.single_statement() as conn:
            await conn.execute(
                _JOIN, {"b_cluster": cluster, "b_node": node, "b_run": run_id, "b_at": utcnow()}
            )

    async def leave_slot_queue(self, *, cluster: str, node: str) -> None:
        async with self.single_statement() as conn:
            await conn.execute(_DEQUEUE, {"cluster": cluster, "node": node})

    async def slot_queue(self, cluster: str) -> list[str]:
        async with self.reading() as conn:
            rows = (
                await conn.execute(
                    select(t.slot_waiters.c.node)
                    .where(t.slot_waiters.c.cluster == cluster)
                    .order_by(t.slot_waiters.c.id)
                )
            ).all()
        return [r.node for r in rows]

    async def slot_queues(self) -> dict[str, list[str]]:
        """Every cluster's queue in arrival order, read with one statement."""
        async with self.reading() as conn:
            rows = (
                await conn.execute(
                    select(t.slot_waiters.c.cluster, t.slot_waiters.c.node).order_by(
                        t.slot_waiters.c.id
                    )
                )
            ).all()
        queues: dict[str, list[str]] = {}
        for row in rows:
            queues.setdefault(str(row.cluster), []).append(str(row.node))
        return queues

    async def slot_state(self, cluster: str) -> tuple[list[SlotRecord], list[tuple[int, str]]]:
        """The cluster's held slots and its queue (place, node) in arrival order, read
        over one connection."""
        async with self.reading() as conn:
            held = [
                record_of(SlotRecord, r)
                for r in await conn.execute(_HELD_ROWS, {"cluster": cluster})
            ]
            queue = [
                (int(r.id), str(r.node)) for r in await conn.execute(_QUEUE, {"cluster": cluster})
            ]
        return held, queue

    async def slot_fingerprints(self, clusters: Sequence[str]) -> dict[str, SlotFingerprint]:
        """Per cluster: slots held, nodes queued and the sum of their places, in one
        statement (another instance's change to a cluster changes its fingerprint)."""
        names = list(clusters)
        if not names:
            return {}
        held = (
            select(
                literal("h").label("kind"),
                t.cluster_slots.c.cluster,
                func.count().label("n"),
                literal(0).label("places"),
            )
            .where(t.cluster_slots.c.cluster.in_(names))
            .group_by(t.cluster_slots.c.cluster)
        )
        queued = (
            select(
                literal("q").label("kind"),
                t.slot_waiters.c.cluster,
                func.count().label("n"),
                func.coalesce(func.sum(t.slot_waiters.c.id), 0).label("places"),
            )
            .where(t.slot_waiters.c.cluster.in_(names))
            .group_by(t.slot_waiters.c.cluster)
        )
        async with self.reading() as conn:
            rows = (await conn.execute(union_all(held, queued))).all()
        counts: dict[str, list[int]] = {name: [0, 0, 0] for name in names}
        for kind, cluster, n, places in rows:
            entry = counts.setdefault(str(cluster), [0, 0, 0])
            if kind == "h":
                entry[0] = int(n)
            else:
                entry[1], entry[2] = int(n), int(places)
        return {
            name: SlotFingerprint(held=h, queued=q, places=p) for name, (h, q, p) in counts.items()
        }

    async def slot_waiter_counts(self) -> dict[str, int]:
        """Nodes waiting for a slot, per cluster."""
        query = select(t.slot_waiters.c.cluster, func.count()).group_by(t.slot_waiters.c.cluster)
        async with self.reading() as conn:
            rows = (await conn.execute(query)).all()
        return {str(r[0]): int(r[1]) for r in rows}
