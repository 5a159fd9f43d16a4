"""STUB (issue 14): owned by helper G2; see /work/issue14-common.md."""
