"""Support code for the tests: servers they run, helpers they share."""
