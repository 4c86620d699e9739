"""A move is a parent of two child operations (its halves) instead of five target columns.

Each journaled move gets its return ("<move>.return", on the source) and its activation
("<move>.activate", on the target) as rows of their own that name the move in
``parent_operation_id``; the five ``target_*`` columns go. A move in flight resumes from
its halves where the columns left it:

    move state  target request  target answer   return half   activation half
    prepared    -               -               prepared      planned
    answered    -               -               answered*     planned
    answered    set             -               completed     prepared
    answered    set             set*            completed     answered*
    completed   set             set             completed     completed
    refused     -               -               refused       planned

(* journaled by older Administrators before the License Server installed it: the half
installs it again, which is a no-op when it was installed.) Downgrading folds the halves
back into the columns.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-08
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

EMPTY = sa.text("''")

COLUMNS = (
    "operation_id, kind, state, license_server, host_id, activation_id, count, request_id, "
    "request_envelope, response_envelope, created_at, updated_at, certificate_id, offline, "
    '"force", revoked_leases, result, last_error, last_error_code, parent_operation_id'
)

RETURN_HALVES = f"""
INSERT INTO operations ({COLUMNS})
SELECT operation_id || '.return', 'return',
       CASE WHEN state = 'answered' AND target_request_envelope IS NOT NULL
            THEN 'completed' ELSE state END,
       license_server, host_id, '', 0, request_id,
       request_envelope, response_envelope, created_at, updated_at, certificate_id, offline,
       "force", revoked_leases,
       CASE WHEN state = 'refused' THEN result END,
       CASE WHEN state = 'refused' THEN last_error ELSE '' END,
       CASE WHEN state = 'refused' THEN last_error_code ELSE '' END,
       operation_id
FROM operations WHERE kind = 'move'
"""

ACTIVATION_HALVES = f"""
INSERT INTO operations ({COLUMNS})
SELECT operation_id || '.activate', 'activate',
       CASE WHEN state = 'completed' THEN 'completed'
            WHEN state = 'answered' AND target_response_envelope IS NOT NULL THEN 'answered'
            WHEN state = 'answered' AND target_request_envelope IS NOT NULL THEN 'prepared'
            ELSE 'planned' END,
       target_license_server, target_host_id, activation_id, count,
       CASE WHEN target_request_id = '' THEN operation_id || '.activate'
            ELSE target_request_id END,
       COALESCE(target_request_envelope, :empty), target_response_envelope,
       created_at, updated_at, '', offline, "force", 0,
       CASE WHEN state = 'completed' THEN result END,
       '', '', operation_id
FROM operations WHERE kind = 'move'
"""


def _half(column: str, suffix: str, condition: str = "") -> str:
    return (
        f"(SELECT half.{column} FROM operations AS half "
        f"WHERE half.operation_id = operations.operation_id || '{suffix}'{condition})"
    )


PREPARED_HALF = " AND half.state <> 'planned'"
FOLD_HALVES = f"""
UPDATE operations SET
    target_license_server = COALESCE({_half("license_server", ".activate")}, ''),
    target_host_id = COALESCE({_half("host_id", ".activate")}, ''),
    target_request_id = COALESCE({_half("request_id", ".activate", PREPARED_HALF)}, ''),
    target_request_envelope = {_half("request_envelope", ".activate", PREPARED_HALF)},
    target_response_envelope = {_half("response_envelope", ".activate")},
    request_envelope = COALESCE({_half("request_envelope", ".return")}, request_envelope),
    response_envelope = COALESCE(response_envelope, {_half("response_envelope", ".return")}),
    state = CASE WHEN state = 'prepared' AND {_half("state", ".return")} = 'completed'
                 THEN 'answered' ELSE state END
WHERE kind = 'move' AND parent_operation_id = ''
"""


def target_columns() -> list[sa.Column[object]]:
    # Fresh objects each time: a Column attaches to the table it is added to.
    return [
        sa.Column("target_license_server", sa.Text, nullable=False, server_default=EMPTY),
        sa.Column("target_host_id", sa.String(32), nullable=False, server_default=EMPTY),
        sa.Column("target_request_id", sa.String(128), nullable=False, server_default=EMPTY),
        sa.Column("target_request_envelope", sa.LargeBinary, nullable=True),
        sa.Column("target_response_envelope", sa.LargeBinary, nullable=True),
    ]


def upgrade() -> None:
    with op.batch_alter_table("operations") as batch:
        batch.add_column(
            sa.Column("parent_operation_id", sa.String(128), nullable=False, server_default=EMPTY)
        )
        batch.create_index("ix_operations_parent_operation_id", ["parent_operation_id"])
    op.execute(sa.text(RETURN_HALVES))
    op.execute(
        sa.text(ACTIVATION_HALVES).bindparams(sa.bindparam("empty", b"", type_=sa.LargeBinary))
    )
    with op.batch_alter_table("operations") as batch:
        for column in target_columns():
            batch.drop_column(column.name)


def downgrade() -> None:
    with op.batch_alter_table("operations") as batch:
        for column in target_columns():
            batch.add_column(column)
    op.execute(sa.text(FOLD_HALVES))
    op.execute(sa.text("DELETE FROM operations WHERE parent_operation_id <> ''"))
    with op.batch_alter_table("operations") as batch:
        batch.drop_index("ix_operations_parent_operation_id")
        batch.drop_column("parent_operation_id")
