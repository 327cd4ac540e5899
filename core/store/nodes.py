"""Nodes: what the configuration declares and what tgops last saw on each node."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import Any

from sqlalchemy import Update, bindparam, insert, select, update

from core.errors import StoreError
from core.store import tables as t
from core.store.base import StoreBase, record_of
from core.store.journal import row_change
from core.store.records import NodeRecord

_NODE = select(t.nodes).where(t.nodes.c.name == bindparam("name"))
_NODES = select(t.nodes).order_by(t.nodes.c.name)
_NODES_NAMED = _NODES.where(t.nodes.c.name.in_(bindparam("names", expanding=True)))


@cache
def _change(columns: tuple[str, ...], expect_version: bool) -> Update:
    """A node's row changed in ``columns`` (and its version counted up), returning it; built
    once per set of columns."""
    query = row_change(t.nodes, columns)
    if expect_version:
        query = query.where(t.nodes.c.version == bindparam("b_version"))
    return query.returning(t.nodes)


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
        async with self.reading() as conn:
            row = (await conn.execute(_NODE, {"name": name})).first()
        return None if row is None else record_of(NodeRecord, row)

    async def nodes(self, names: Sequence[str] | None = None) -> list[NodeRecord]:
        if names is None:
            return await self._all(_NODES, NodeRecord)
        return await self._all(_NODES_NAMED, NodeRecord, {"names": list(names)})

    async def update_node(
        self, name: str, *, expect_version: int | None = None, **values: Any
    ) -> NodeRecord:
        """Change a node's row. With ``expect_version`` the change is made only if nobody
        changed the row since that version was read; otherwise the row is left as it is."""
        query = _change(tuple(sorted(values)), expect_version is not None)
        params = {f"v_{key}": value for key, value in values.items()}
        params["b_key"] = name
        if expect_version is not None:
            params["b_version"] = expect_version
        async with self.single_statement() as conn:  # PostgreSQL: one round trip
            changed = (await conn.execute(query, params)).first()
        if changed is not None:
            return record_of(NodeRecord, changed)
        # with a version: changed by someone else since it was read, the row as it is now
        found = None if expect_version is None else await self.node(name)
        if found is None:
            raise StoreError(f"node {name} is not in the store")
        return found
