"""Troupe operator: reconciles Agent and Workflow resources into running agents."""

__version__ = "0.1.0"
