"""fleet: the controller — keys and signed releases, device registry, rollouts, telemetry, demo."""

__version__ = "0.1.0"
