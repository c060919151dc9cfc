"""
PTY jobs: interactive containers attached to a terminal in the browser.
"""

from flynnsched.pty.assets import StaticAssets, default_web_root
from flynnsched.pty.origin import OriginPolicy
from flynnsched.pty.resource import PtyResource
from flynnsched.pty.session import PtyConfig, PtyManager

__all__ = ["OriginPolicy", "PtyConfig", "PtyManager", "PtyResource", "StaticAssets", "default_web_root"]
