"""The read-only HTTP side: `server` (aiohttp: /metrics, /healthz, /readyz, the dashboard),
`metrics` (the exposition writer), `access` (Host check, token, cookie), `counters` (the
publishers' own fb303 counters) and `dashboard/` (static assets shipped in the wheel)."""
