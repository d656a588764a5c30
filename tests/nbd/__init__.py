"""Tests of the NBD server's limits, streaming and robustness (new layout: tests/nbd/)."""
