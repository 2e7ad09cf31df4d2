"""One reading of a cell: its source, the failing loop, and the failed cell as a record."""
