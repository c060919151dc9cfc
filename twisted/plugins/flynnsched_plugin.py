"""
The twistd plugin: ``twistd flynnsched``.

Kept tiny and lazy: nothing of flynnsched is imported until the plugin is used.
"""

from twisted.application.service import ServiceMaker

flynnsched = ServiceMaker(
    "flynnsched",
    "flynnsched.tap",
    "A container scheduler: batch, service and PTY jobs on Docker.",
    "flynnsched",
)
