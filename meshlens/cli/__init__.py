"""The `meshlens` command: the composition root that wires every part together."""
