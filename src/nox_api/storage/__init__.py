"""Storage: SQLAlchemy models and Alembic migrations. SQLite by default, any URL by setting."""
