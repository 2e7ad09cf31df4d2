"""What is on the card and who holds it: snapshots, holders, freeing what a failure pinned, tracing, processes."""
