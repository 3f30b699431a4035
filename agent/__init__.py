"""edge-agent: the daemon that runs models on one edge device."""

__version__ = "0.1.0"
# A clock earlier than this is wrong for sure: metadata expiry cannot be judged with it (agent.update.verify).
# Bump with each release.
BUILD_DATE = "2026-11-24"
