"""Virtual machines: specs, datastores, host facts, QEMU processes under a supervisor: the runtime."""
