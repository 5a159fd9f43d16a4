"""STUB (issue 14): owned by helper G1; see /work/issue14-common.md."""
