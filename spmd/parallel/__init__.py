"""Parallel schemes beyond one global synchronous step (local SGD / DiLoCo, ...)."""
