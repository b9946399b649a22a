from tests.integration.conftest import dns, mta_factory, mx_port, redis_server, sinks

__all__ = ["dns", "mta_factory", "mx_port", "redis_server", "sinks"]
