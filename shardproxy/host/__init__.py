"""What this host can do and how to ask it: socket options (``sockopts``),
descriptor limits (``rlimits``) and how to start a child interpreter with
this process's packages (``runtime``)."""
