"""
flynnsched: a container scheduler daemon on Twisted for batch, service and PTY jobs on Docker.
"""

__all__: list[str] = []
