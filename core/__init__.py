"""The dependency-free core: the scoring contract, ranking, batching and domain errors.

Nothing here imports `engines`, `gateway`, a web framework, Prometheus or settings; every other layer imports
downward from here (core -> engines -> scheduler/service -> HTTP edge -> CLI).
"""
