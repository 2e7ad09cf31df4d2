"""The side-effect guard: what the failed run already did that a re-run would repeat."""
