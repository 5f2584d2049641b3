"""The store: fetched results of runs, verified, and their ingestion into the registry.

Modules, one job each: `layout` (what goes where, path safety), `manifest` (reading a run's own
records), `sources` (local filesystem, rsync over ssh), `copying` (plan, temporary copy, verify,
rename), `ingest` (files -> rows), `fetch` (the service `satrl fetch` calls).
"""
