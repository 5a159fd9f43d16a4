"""STUB (issue 14): owned by helper T; see /work/issue14-common.md."""
