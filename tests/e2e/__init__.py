"""End-to-end: install the chart, the bundle or the GitOps folder and run a team through it."""
