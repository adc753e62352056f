"""Per-aimage request/response stages (ImageConfiguration.middleware), each a small module."""
