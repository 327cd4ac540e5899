"""Nodes: what the configuration declares and what tgops last saw on each node."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import insert, select, update

from core.errors import StoreError
from core.store import tables as t
from core.store.base import StoreBase, record_of
from core.store.records import NodeRecord


class NodesStore(StoreBase):
    """Nodes: what the configuration declares and what tgops last saw on each node."""

    async def sync_nodes(self, declared: Sequence[tuple[str, str | None, str]]) -> None:
        """Make the node table match the configuration (name, cluster, driver).

        Nodes no longer configured keep their rows (history stays readable) but are not
        listed by ``nodes()`` unless asked.
        """
        async with self.transaction() as conn:
            existing = {r.name for r in await conn.execute(select(t.nodes.c.name))}
            for name, cluster, driver in declared:
                if name in existing:
                    await conn.execute(
                        update(t.nodes)
                        .where(t.nodes.c.name == name)
                        .values(cluster=cluster, driver=driver)
                    )
                else:
                    await conn.execute(
                        insert(t.nodes).values(
                            name=name,
                            cluster=cluster,
                            driver=driver,
                            installed={},
                            staged={},
                            sessions=0,
                            logon_enabled=True,
                            lb="in" if cluster else None,
                            restart_required=False,
                            optional_packages=[],
                            reachable=True,
                            version=0,
                        )
                    )

    async def node(self, name: str) -> NodeRecord | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(t.nodes).where(t.nodes.c.name == name))).first()
        return None if row is None else record_of(NodeRecord, row)

    async def nodes(self, names: Sequence[str] | None = None) -> list[NodeRecord]:
        query = select(t.nodes).order_by(t.nodes.c.name)
        if names is not None:
            query = query.where(t.nodes.c.name.in_(list(names)))
        return await self._all(query, NodeRecord)

    async def update_node(
        self, name: str, *, expect_version: int | None = None, **values: Any
    ) -> NodeRecord:
        """Change a node's row. With ``expect_version`` the change is made only if nobody
        changed the row since that version was read; otherwise the row is left as it is."""
        async with self.transaction() as conn:
            query = update(t.nodes).where(t.nodes.c.name == name)
            if expect_version is not None:
                query = query.where(t.nodes.c.version == expect_version)
            changed = (
                await conn.execute(
                    query.values(version=t.nodes.c.version + 1, **values).returning(t.nodes)
                )
            ).first()
            if changed is None:
                if expect_version is None:
                    raise StoreError(f"node {name} is not in the store")
                row = (await conn.execute(select(t.nodes).where(t.nodes.c.name == name))).one()
                return record_of(NodeRecord, row)
        return record_of(NodeRecord, changed)
