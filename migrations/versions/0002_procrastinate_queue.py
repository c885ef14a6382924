"""procrastinate's tables and functions: the shard queue (PostgreSQL only)

Runs the schema SQL that the installed procrastinate package ships (pinned to 3.10.0 in
pyproject.toml), so the queue is created and versioned with the rest of the store. Upgrading
procrastinate later means a new migration that runs its own migration files from
`procrastinate.schema.SchemaManager.get_migrations_path()`. SQLite has no queue: nothing to do.

Revision ID: 0002
Revises: 0001
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# Everything procrastinate creates is named procrastinate_*: tables (their sequences, indexes
# and triggers go with them), functions, enum types and composite types.
DROP = r"""
DO $$
DECLARE
    item record;
BEGIN
    FOR item IN SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE n.nspname = current_schema() AND c.relkind = 'r'
                   AND c.relname LIKE 'procrastinate\_%'
    LOOP
        EXECUTE format('DROP TABLE IF EXISTS %I CASCADE', item.relname);
    END LOOP;
    FOR item IN SELECT p.oid::regprocedure AS signature FROM pg_proc p
                  JOIN pg_namespace n ON n.oid = p.pronamespace
                 WHERE n.nspname = current_schema() AND p.proname LIKE 'procrastinate\_%'
    LOOP
        EXECUTE format('DROP FUNCTION IF EXISTS %s CASCADE', item.signature);
    END LOOP;
    FOR item IN SELECT t.typname FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
                 WHERE n.nspname = current_schema() AND t.typtype IN ('e', 'c')
                   AND t.typname LIKE 'procrastinate\_%'
    LOOP
        EXECUTE format('DROP TYPE IF EXISTS %I CASCADE', item.typname);
    END LOOP;
END;
$$;
"""


def _execute_raw(sql: str) -> None:
    # Straight to psycopg with no parameters: the SQL holds % signs (RAISE messages, format())
    # that a parameter-aware execute would take for placeholders. Same connection, so the same
    # transaction as the rest of the migration.
    op.get_bind().connection.driver_connection.execute(sql)


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    from procrastinate.schema import SchemaManager

    _execute_raw(SchemaManager.get_schema())


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    _execute_raw(DROP)
