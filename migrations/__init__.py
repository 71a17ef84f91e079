"""Alembic migrations; `optiforge migrate` (and `optiforge serve`) upgrade to head."""
