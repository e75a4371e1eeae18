"""What shardproxy tells operators: the workers' stats snapshots as types
(``snapshot``), their aggregation (``stats``), Prometheus metrics
(``metrics``), ECS logs (``logs``) and the ``shardproxy status`` view
(``status``)."""
