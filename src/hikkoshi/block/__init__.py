"""What an export serves: block device layers (raw file; later dirty tracking, mirror, proxy cache)."""
