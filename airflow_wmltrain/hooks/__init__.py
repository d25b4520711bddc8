"""Hooks: connections to object stores (S3, OpenStack Swift) and Docker hosts."""
