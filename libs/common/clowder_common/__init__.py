"""What every Clowder service shares: config, etcd state, errors, auth, lifecycle."""
