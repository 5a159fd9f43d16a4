"""STUB (issue 14): owned by helper G4; see /work/issue14-common.md."""
