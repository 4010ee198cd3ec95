"""L7 reverse proxy (aiohttp)."""
