"""The ``troupe`` command line: drive and inspect workflows, agents, dead letters and state.

``main`` parses and dispatches, ``nats_ops`` is the only module that talks to
NATS, and ``views`` (derivations) and ``render`` (text and JSON) are pure.
"""
