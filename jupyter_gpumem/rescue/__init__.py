"""A fix as a transaction: snapshot, rollback, and running a plan in the user namespace."""
