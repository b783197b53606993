"""Who submitted each job.

Revision 0003, after 0002: ``jobs.submitted_by``, the name of the API token that submitted the job
(null for the jobs submitted before tokens had names).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("submitted_by", sa.String(100)))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("submitted_by")
