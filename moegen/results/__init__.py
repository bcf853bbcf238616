"""Where results go: `database` (the results database: SQLite by default, PostgreSQL by URL; runs,
their metrics and environments, trends and regressions read back)."""
