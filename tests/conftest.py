"""Shared fixtures: real PostgreSQL and Redis, the prepared model, one engine.

Integration tests talk to the services CI starts (see .ci/run). A service
that cannot be reached is a failure, never a skip.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis
import structlog

from pipelines.store import ChartStore
from schemas.settings import Settings
from schemas.tables import Base

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
EXAMPLES = REPO / "chartsum" / "examples" / "stays.jsonl"

PG_ADMIN_URL = os.environ.get(
    "CHARTSUM_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("CHARTSUM_TEST_REDIS", "redis://127.0.0.1:6379/15")


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test starts with no CHARTSUM_ variables and no bound log context."""
    for name in list(os.environ):
        if name.startswith("CHARTSUM_") and not name.startswith("CHARTSUM_TEST_"):
            monkeypatch.delenv(name)
    structlog.contextvars.clear_contextvars()
    yield
    structlog.contextvars.clear_contextvars()


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session; its SQLAlchemy URL."""
    name = f"chartsum_test_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace(
        "postgresql://", "postgresql+psycopg://"
    )
    yield f"{base}/{name}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _truncate(store: ChartStore) -> None:
    tables = [table.name for table in reversed(Base.metadata.sorted_tables)]
    with store.engine.begin() as conn:
        if store.engine.dialect.name == "postgresql":
            conn.exec_driver_sql(f"TRUNCATE {', '.join(tables)} CASCADE")
        else:
            for table in tables:
                conn.exec_driver_sql(f"DELETE FROM {table}")


@pytest.fixture
def pg_store(pg_database: str) -> Iterator[ChartStore]:
    """A migrated, empty PostgreSQL store."""
    store = ChartStore(pg_database)
    store.migrate()
    _truncate(store)
    yield store
    _truncate(store)
    store.close()


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[ChartStore]:
    """A migrated, empty SQLite store in a temporary folder."""
    store = ChartStore(f"sqlite:///{tmp_path / 'chartsum.db'}")
    store.migrate()
    yield store
    store.close()


@pytest.fixture(params=["postgresql", "sqlite"])
def store(request: pytest.FixtureRequest) -> ChartStore:
    """Each store test runs on PostgreSQL and on the embedded SQLite."""
    fixture = "pg_store" if request.param == "postgresql" else "sqlite_store"
    found: ChartStore = request.getfixturevalue(fixture)
    return found


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A flushed Redis database for one test."""
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield REDIS_URL
    client.flushdb()
    client.close()


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The prepared embedded model (prepared here if CI has not already)."""
    from pipelines.model import prepare_embedded_model

    return prepare_embedded_model(target_dir=Settings().model_dir).path
