"""
The browser assets of flynnsched (the terminal page and xterm.js), installed as package data.
"""

__all__: list[str] = []
