"""The workflow engine: event-sourced DAG runs across agents on JetStream.

``events`` defines what happens in a run, ``projection`` folds events into the
run's state, ``planner`` decides the next actions from that state (all pure);
``engine`` is the I/O loop that appends events, keeps the projection in KV and
talks to agents.
"""
