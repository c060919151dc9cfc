"""
Packaging for flynnsched: the daemon, its twistd plugin and its web assets.

Runtime dependencies are pinned here and nowhere else.
"""

from setuptools import find_packages, setup

setup(
    name="flynnsched",
    version="0.1.0",
    description="A container scheduler daemon on Twisted: batch, service and PTY jobs on Docker.",
    long_description=open("README.rst", encoding="utf-8").read(),
    long_description_content_type="text/x-rst",
    python_requires=">=3.11",
    packages=find_packages(include=["flynnsched", "flynnsched.*"]) + ["flynnsched.web", "twisted.plugins"],
    # The browser assets in web/ are installed as flynnsched/web: our own files and the run-time
    # files of xterm.js (web/node_modules comes from `npm ci --prefix web`, i.e. `make web`).
    package_dir={"flynnsched.web": "web"},
    package_data={
        "twisted.plugins": ["flynnsched_plugin.py"],
        "flynnsched.web": [
            "*.html",
            "*.js",
            "*.css",
            "node_modules/@xterm/xterm/lib/xterm.js",
            "node_modules/@xterm/xterm/css/xterm.css",
            "node_modules/@xterm/addon-fit/lib/addon-fit.js",
            "node_modules/@xterm/xterm/LICENSE",
            "node_modules/@xterm/addon-fit/LICENSE",
        ],
    },
    include_package_data=True,
    install_requires=[
        "Twisted[tls]==26.10.0",
        "treq==26.7.0",
        "autobahn==26.10.2",
        "pyOpenSSL==26.4.0",
        "service-identity==26.1.0",
        "attrs==26.1.0",
        "zope.interface==8.7",
    ],
    zip_safe=False,
)
