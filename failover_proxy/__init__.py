"""failover-proxy: a multi-cloud failover reverse proxy and traffic router."""

__version__ = "0.1.0"
