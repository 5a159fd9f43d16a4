"""Pure builders: specs and observations in, manifests and statuses out. No I/O here."""
