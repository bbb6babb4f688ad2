"""Protocol and format translation: reusable pieces for services and the gateway.

Filled in by the modules of this package; see their docstrings.
"""
