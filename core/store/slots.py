"""Cluster slots and their queue (L12): at most N nodes of a cluster out of load balancing."""

from __future__ import annotations

from sqlalchemy import delete, func, insert, select
from sqlalchemy.exc import IntegrityError, OperationalError

from core.store import tables as t
from core.store.base import StoreBase, utcnow
from core.store.records import SlotRecord


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
    ) -> int | None:
        """Take a free slot of the cluster for ``node``; ``None`` when all ``limit`` are held.

        A node that already holds a slot gets it back (idempotent after a restart). Slots
        are rows with a primary key (cluster, slot): two instances can never both insert
        the same one, so the limit holds across processes.
        """
        for _ in range(limit + 1):
            async with self.transaction() as conn:
                held = (
                    await conn.execute(
                        select(t.cluster_slots.c.slot, t.cluster_slots.c.node).where(
                            t.cluster_slots.c.cluster == cluster
                        )
                    )
                ).all()
                for row in held:
                    if row.node == node:
                        return int(row.slot)
                taken = {int(r.slot) for r in held}
                free = [s for s in range(limit) if s not in taken]
                if not free:
                    return None
                try:
                    await conn.execute(
                        insert(t.cluster_slots).values(
                            cluster=cluster,
                            slot=free[0],
                            node=node,
                            run_id=run_id,
                            owner=owner,
                            taken_at=utcnow(),
                        )
                    )
                    await conn.execute(
                        delete(t.slot_waiters).where(
                            t.slot_waiters.c.cluster == cluster, t.slot_waiters.c.node == node
                        )
                    )
                except IntegrityError:
                    await conn.rollback()
                    continue  # another instance took it first: look again
                except OperationalError:
                    await conn.rollback()
                    continue
                return free[0]
        return None

    async def release_slot(self, *, cluster: str, node: str) -> bool:
        async with self.transaction() as conn:
            result = await conn.execute(
                delete(t.cluster_slots).where(
                    t.cluster_slots.c.cluster == cluster, t.cluster_slots.c.node == node
                )
            )
        return bool(result.rowcount)

    async def slots(self, cluster: str | None = None) -> list[SlotRecord]:
        query = select(t.cluster_slots).order_by(t.cluster_slots.c.cluster, t.cluster_slots.c.slot)
        if cluster is not None:
            query = query.where(t.cluster_slots.c.cluster == cluster)
        return await self._all(query, SlotRecord)

    async def wait_for_slot(self, *, cluster: str, node: str, run_id: int | None) -> None:
        """Join the cluster's queue (ordered by arrival) unless already in it."""
        async with self.transaction() as conn:
            present = (
                await conn.execute(
                    select(t.slot_waiters.c.id).where(
                        t.slot_waiters.c.cluster == cluster, t.slot_waiters.c.node == node
                    )
                )
            ).first()
            if present is None:
                await conn.execute(
                    insert(t.slot_waiters).values(
                        cluster=cluster, node=node, run_id=run_id, queued_at=utcnow()
                    )
                )

    async def leave_slot_queue(self, *, cluster: str, node: str) -> None:
        async with self.transaction() as conn:
            await conn.execute(
                delete(t.slot_waiters).where(
                    t.slot_waiters.c.cluster == cluster, t.slot_waiters.c.node == node
                )
            )

    async def slot_queue(self, cluster: str) -> list[str]:
        async with self.engine.connect() as conn:
            rows = (
                await conn.execute(
                    select(t.slot_waiters.c.node)
                    .where(t.slot_waiters.c.cluster == cluster)
                    .order_by(t.slot_waiters.c.id)
                )
            ).all()
        return [r.node for r in rows]

    async def slot_waiter_counts(self) -> dict[str, int]:
        """Nodes waiting for a slot, per cluster."""
        query = select(t.slot_waiters.c.cluster, func.count()).group_by(t.slot_waiters.c.cluster)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return {str(r[0]): int(r[1]) for r in rows}
