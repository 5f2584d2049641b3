"""The shared poll rate limit when several processes poll a backend for the first time."""

from __future__ import annotations

import threading
import time

from orchestrator.reconcile import claim_poll
from orchestrator.registry.db import Registry


def test_first_polls_racing_claim_exactly_once(database_url: str) -> None:
    registries = [Registry(database_url) for _ in range(4)]
    barrier = threading.Barrier(len(registries))
    claimed: list[bool] = []
    errors: list[BaseException] = []
    now = time.time()  # one clock: a poll stamped earlier than the last one counts as a new poll

    def poll(registry: Registry) -> None:
        barrier.wait()
        try:
            claimed.append(claim_poll(registry, "slurm", 60.0, now, force=False))
        except BaseException as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=poll, args=(r,)) for r in registries]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for registry in registries:
        registry.dispose()
    assert errors == []
    assert sorted(claimed) == [False, False, False, True]
