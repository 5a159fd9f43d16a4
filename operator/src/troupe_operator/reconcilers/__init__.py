"""Level-based reconcile passes for Agents and Workflows, and the periodic resync."""
