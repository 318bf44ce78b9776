"""Routing state learned from outcomes and shared through Redis: cache, health, performance,
spend, experiments and rate limits. Pure logic here; the Redis I/O is batched by its callers."""
