"""dispatch tracking: batch token and last sighting on jobs, scheduler poll marks

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 07:50:00

jobs.batch holds the dispatch token that is also the scheduler job name, written before the
submission, so a crash between the scheduler accepting a job and the registry recording its id is
recovered by finding the job by name. jobs.seen_at is when the scheduler last listed the job (the
start of the grace period before a job the scheduler forgot becomes lost). scheduler_polls rate
limits scheduler queries per backend across every satrl process sharing the registry.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('batch', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('seen_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index('ix_jobs_batch', ['batch'], unique=False)
    op.create_table('scheduler_polls',
    sa.Column('backend', sa.String(length=16), nullable=False),
    sa.Column('polled_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('calls', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('backend', name=op.f('pk_scheduler_polls'))
    )


def downgrade() -> None:
    op.drop_table('scheduler_polls')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_batch')
        batch_op.drop_column('seen_at')
        batch_op.drop_column('batch')
