"""Virtual machines: specs, datastores, QEMU processes, and guest images for tests and demos."""
