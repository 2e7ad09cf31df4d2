"""Recognising an out-of-memory error anywhere in an exception chain, and parsing its message. Stdlib only."""
