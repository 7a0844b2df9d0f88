"""Runner, feature cache and the append-only results store."""
