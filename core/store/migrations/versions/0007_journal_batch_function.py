"""PostgreSQL: the function that runs a run journal transaction in one round trip

``tgops_batch(names, statements, rows)`` runs each statement with its rows (a JSON array)
as ``$1``, in order, inside the transaction of the statement that calls it
(``core.store.journal_pg``). SQLite needs nothing: a transaction is one trip there.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06
"""

from __future__ import annotations

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


# SECURITY INVOKER: it runs what its caller could run itself, with the caller's rights.
# Each statement is prepared once per connection under the name its caller gives it (a
# digest of its text), so that it is planned once, not at every call; the names prepared
# are kept in the connection's setting ``tgops.prepared`` (a look there is cheaper than
# one at ``pg_prepared_statements``, which lists every statement the driver prepared;
# that list is asked only when the setting does not know a name, as after a call that
# failed and so set it back). The statements find their rows by key, joined to a handful
# of rows of the parameter, which the planner, with tables that grow quickly and a
# parameter it cannot see into, would hash against a whole table instead: nested loops
# only, while the function runs.
CREATE = """
CREATE OR REPLACE FUNCTION tgops_batch(names text[], statements text[], rows json)
RETURNS void LANGUAGE plpgsql SECURITY INVOKER
SET enable_hashjoin = off SET enable_mergejoin = off
AS $body$
DECLARE
    known text := coalesce(current_setting('tgops.prepared', true), '');
BEGIN
    FOR i IN 1 .. coalesce(array_length(statements, 1), 0) LOOP
        IF strpos(known, names[i] || ',') = 0 THEN
            IF NOT EXISTS (SELECT FROM pg_prepared_statements WHERE name = names[i]) THEN
                EXECUTE format('PREPARE %I(json) AS %s', names[i], statements[i]);
            END IF;
            known := known || names[i] || ',';
            PERFORM set_config('tgops.prepared', known, false);
        END IF;
        EXECUTE format('EXECUTE %I(%L)', names[i], rows -> (i - 1));
    END LOOP;
END
$body$
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(CREATE)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION tgops_batch(text[], text[], json)")
