"""What a Troupe process serves and emits besides messages: health, metrics, logs, traces."""
