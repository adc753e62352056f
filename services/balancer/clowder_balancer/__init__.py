"""balancer service."""
