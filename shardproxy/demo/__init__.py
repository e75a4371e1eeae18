"""The built-in echo backend ``shardproxy demo`` runs (``python -m
shardproxy.demo.echo`` on its own)."""
