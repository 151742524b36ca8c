"""sluice: an edge/sidecar reverse proxy that runs every request through proxy-wasm filters.

Modules: `config` (YAML -> validated `SluiceConfig`), `routing` (`Router`), `cli` (the `sluice`
command). Nothing is imported here so that `import proxy.config` stays cheap.
"""
