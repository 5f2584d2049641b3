"""Shared fixtures, one module per concern under tests/fixtures/ (each owned by one part)."""

pytest_plugins = [
    "tests.fixtures.db",
    "tests.fixtures.trained",
    "tests.fixtures.slurm",
    "tests.fixtures.sshd",
]
