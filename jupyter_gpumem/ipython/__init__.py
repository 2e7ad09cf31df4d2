"""The host's idioms: the extension, the exception hook, tracebacks, magics, per-cell stats."""
