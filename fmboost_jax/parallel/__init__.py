"""Parallelism: the device mesh and sharding rules, and joining a multi-process run."""
