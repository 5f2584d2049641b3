"""Results: the paper's tables and figures from the registry, and import of published results.

Every number comes from the registry by SQL (`scores`); the other modules turn those numbers into
the per-game table and wins (`table`), rliable aggregates (`aggregates`), learning curves
(`curves`), a comparison of two experiments (`compare`) and rendered output (`render`). `report`
ties them together for `satrl report`; `published` imports the study's published pickle.
"""
