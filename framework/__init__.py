"""msa-framework: an asynchronous, event-driven microservice framework for Python.

Services talk through events on a message bus (in-memory or Apache Kafka) and through HTTP, keep
exactly-once effects with a transactional outbox and an idempotent inbox, coordinate with sagas,
and sit behind an aiohttp API gateway.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("msa-framework")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
