"""Database fixtures for the attribution tests: a fresh SQLite file, and PostgreSQL when one answers.

PostgreSQL comes from LONGTAIL_TEST_PG_URL, else the local default; each test
gets its own schema, dropped afterwards, so parallel runs never share tables.
"""

from __future__ import annotations

import os
import uuid

import pytest
from sqlalchemy import create_engine, text

DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def _pg_url() -> tuple[str | None, str]:
    url = os.environ.get("LONGTAIL_TEST_PG_URL", DEFAULT_PG_URL)
    try:
        engine = create_engine(url, connect_args={"connect_timeout": 2})
        with engine.connect() as connection:
            connection.execute(text("select 1"))
        engine.dispose()
    except Exception as error:  # any failure to connect means "no PostgreSQL here"
        return None, f"no PostgreSQL answers at {url} ({type(error).__name__}); set LONGTAIL_TEST_PG_URL"
    return url, ""


PG_URL, PG_SKIP_REASON = _pg_url()


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path):
    """(url, schema) for a store that is empty and private to this test."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'log.db'}", None
        return
    if PG_URL is None:
        pytest.skip(PG_SKIP_REASON)
    schema = f"lt_test_{uuid.uuid4().hex[:12]}"
    engine = create_engine(PG_URL)
    with engine.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield PG_URL, schema
    finally:
        with engine.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()
