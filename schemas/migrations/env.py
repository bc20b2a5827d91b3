"""Alembic environment: runs migrations on the connection URL chartsum passes."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

from schemas.tables import Base

config = context.config
url = str(
    config.attributes.get("connection_url") or config.get_main_option("sqlalchemy.url")
)


def run_migrations() -> None:
    """Upgrade the database at ``url`` inside one transaction."""
    engine = create_engine(url, poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=Base.metadata,
            render_as_batch=connection.dialect.name == "sqlite",
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


run_migrations()
