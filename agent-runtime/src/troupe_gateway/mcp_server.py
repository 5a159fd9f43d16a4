"""STUB (issue 14): owned by helper G3; see /work/issue14-common.md."""
