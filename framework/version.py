"""The installed version of msa-framework (`framework.__version__`), for the API documents."""

from importlib.metadata import PackageNotFoundError, version

__all__ = ["__version__"]

try:
    __version__ = version("msa-framework")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
