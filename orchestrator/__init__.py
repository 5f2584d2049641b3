"""satrl's orchestrator: everything that runs on the user's machine or the cluster login node."""
