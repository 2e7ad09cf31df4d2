"""Reduce batch: find the number that sizes the failing tensors, search for the largest that fits, change it."""
