"""storage service."""
