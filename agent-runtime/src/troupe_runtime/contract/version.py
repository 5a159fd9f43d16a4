"""Troupe's version, read from the installed package metadata.

The repository's ``VERSION`` file is the one source: the packages take it as
their version, the chart's version and appVersion are checked against it by
``make verify``, and the images and default runtime image are tagged with it.
"""

from __future__ import annotations

from importlib.metadata import version

VERSION = version("troupe-runtime")
RUNTIME_IMAGE_REPOSITORY = "troupe/runtime"
DEFAULT_RUNTIME_IMAGE = f"{RUNTIME_IMAGE_REPOSITORY}:{VERSION}"
