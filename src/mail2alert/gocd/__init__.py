"""GoCD: API client, background poller with its last good snapshot, and history."""
