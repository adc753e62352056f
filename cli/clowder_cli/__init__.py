"""The clowder command line."""
