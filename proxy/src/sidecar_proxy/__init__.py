"""sidecar-proxy: a transparent TCP proxy for sidecar traffic interception."""

__version__ = "0.1.0"
