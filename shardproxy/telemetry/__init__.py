"""What shardproxy tells operators: stats snapshots and histograms
(``stats``), Prometheus metrics (``metrics``), ECS logs (``logs``) and the
``shardproxy status`` view (``status``)."""
