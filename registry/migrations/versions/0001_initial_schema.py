"""initial schema

Revision ID: 0001
Revises: 
Create Date: 2026-11-22
"""
from alembic import op
import sqlalchemy as sa


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('adapter_names',
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('last_version', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('name')
    )
    op.create_table('base_models',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('fingerprint', sa.String(length=64), nullable=False),
    sa.Column('architecture', sa.String(length=128), nullable=False),
    sa.Column('path', sa.Text(), nullable=False),
    sa.Column('spec', sa.JSON(), nullable=False),
    sa.Column('source', sa.Text(), nullable=False),
    sa.Column('size_bytes', sa.BigInteger(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('fingerprint'),
    sa.UniqueConstraint('name')
    )
    op.create_table('adapters',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('base_model_id', sa.Integer(), nullable=False),
    sa.Column('peft_type', sa.String(length=32), nullable=False),
    sa.Column('task_type', sa.String(length=64), nullable=True),
    sa.Column('rank', sa.Integer(), nullable=True),
    sa.Column('alpha', sa.Float(), nullable=True),
    sa.Column('target_modules', sa.JSON(), nullable=False),
    sa.Column('config', sa.JSON(), nullable=False),
    sa.Column('size_bytes', sa.BigInteger(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('lineage', sa.JSON(), nullable=True),
    sa.Column('origin', sa.String(length=16), nullable=True),
    sa.ForeignKeyConstraint(['base_model_id'], ['base_models.id'], ),
    sa.ForeignKeyConstraint(['name'], ['adapter_names.name'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name', 'version', name='uq_adapters_name_version')
    )
    with op.batch_alter_table('adapters', schema=None) as batch_op:
        batch_op.create_index('ix_adapters_base_model_id', ['base_model_id'], unique=False)
        batch_op.create_index('ix_adapters_sha256', ['sha256'], unique=False)

    op.create_table('adapter_files',
    sa.Column('adapter_id', sa.Integer(), nullable=False),
    sa.Column('path', sa.String(length=512), nullable=False),
    sa.Column('blob_sha256', sa.String(length=64), nullable=False),
    sa.Column('size_bytes', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['adapter_id'], ['adapters.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('adapter_id', 'path')
    )
    with op.batch_alter_table('adapter_files', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_adapter_files_blob_sha256'), ['blob_sha256'], unique=False)

    op.create_table('evaluations',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('adapter_id', sa.Integer(), nullable=True),
    sa.Column('base_model_id', sa.Integer(), nullable=True),
    sa.Column('metric', sa.String(length=64), nullable=False),
    sa.Column('value', sa.Float(), nullable=False),
    sa.Column('dataset', sa.Text(), nullable=False),
    sa.Column('split', sa.String(length=64), nullable=True),
    sa.Column('details', sa.JSON(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['adapter_id'], ['adapters.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['base_model_id'], ['base_models.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('evaluations', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_evaluations_adapter_id'), ['adapter_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_evaluations_base_model_id'), ['base_model_id'], unique=False)

    op.create_table('lineage_parents',
    sa.Column('child_id', sa.Integer(), nullable=False),
    sa.Column('parent_ref', sa.String(length=200), nullable=False),
    sa.Column('parent_id', sa.Integer(), nullable=True),
    sa.ForeignKeyConstraint(['child_id'], ['adapters.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['parent_id'], ['adapters.id'], ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('child_id', 'parent_ref')
    )
    with op.batch_alter_table('lineage_parents', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_lineage_parents_parent_id'), ['parent_id'], unique=False)

    op.create_table('tags',
    sa.Column('adapter_id', sa.Integer(), nullable=False),
    sa.Column('tag', sa.String(length=128), nullable=False),
    sa.ForeignKeyConstraint(['adapter_id'], ['adapters.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('adapter_id', 'tag')
    )
    with op.batch_alter_table('tags', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_tags_tag'), ['tag'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('tags', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_tags_tag'))

    op.drop_table('tags')
    with op.batch_alter_table('lineage_parents', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_lineage_parents_parent_id'))

    op.drop_table('lineage_parents')
    with op.batch_alter_table('evaluations', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_evaluations_base_model_id'))
        batch_op.drop_index(batch_op.f('ix_evaluations_adapter_id'))

    op.drop_table('evaluations')
    with op.batch_alter_table('adapter_files', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_adapter_files_blob_sha256'))

    op.drop_table('adapter_files')
    with op.batch_alter_table('adapters', schema=None) as batch_op:
        batch_op.drop_index('ix_adapters_sha256')
        batch_op.drop_index('ix_adapters_base_model_id')

    op.drop_table('adapters')
    op.drop_table('base_models')
    op.drop_table('adapter_names')
