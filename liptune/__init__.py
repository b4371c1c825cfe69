"""liptune: 1-Lipschitz networks, their certificates, and a service to tune the trade-off."""

__version__ = "0.1.0"
