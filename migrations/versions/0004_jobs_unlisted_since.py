"""jobs.unlisted_since: the first poll that omitted a job

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26 17:00:00

A job the scheduler stops listing becomes lost a grace period later. Counted from its last
listing (jobs.seen_at), one reply omitting it after an hour in which nobody ran satrl status made
it lost at once, and auto-requeue submitted a second job. jobs.unlisted_since holds the first poll
since its last listing that omitted it; NULL while the scheduler lists it.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("unlisted_since", sa.DateTime(timezone=True),
                                      nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("unlisted_since")
