"""edge-agent: the daemon that runs models on one edge device."""

__version__ = "0.1.0"
