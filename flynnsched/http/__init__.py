"""
The HTTP face of flynnsched: one ``twisted.web`` resource tree built by ``build_root``.
"""

from flynnsched.http.root import build_root

__all__ = ["build_root"]
