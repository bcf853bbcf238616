"""Where results go: the results database (SQLite by default, PostgreSQL by URL) as `schema` (its
tables), `connection` (the URL, engines, one-line errors), `recording` (writing a run and its cells)
and `queries` (runs, history, comparisons, the nightlies' baseline and trend read back); and
`metrics`, the one table of reported metrics."""
