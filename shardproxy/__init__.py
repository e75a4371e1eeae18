"""shardproxy: a WebSocket load balancer for very many concurrent websockets."""

__version__ = "0.1.0"
