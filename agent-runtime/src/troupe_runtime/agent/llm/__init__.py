"""The LLM agent: a model loop with tools, crash-safe through the message's event log."""
