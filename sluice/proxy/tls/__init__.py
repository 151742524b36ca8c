"""TLS for listeners and upstream clusters: contexts, certificates, reload, connection properties."""
