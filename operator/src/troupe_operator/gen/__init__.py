"""Generators of committed artefacts (CRDs, API reference, install bundle, chart version).

Each has ``write`` and ``check`` verbs: ``make crds`` writes, ``make verify``
fails when a committed file drifted from its source.
"""
