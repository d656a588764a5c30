"""The long-running processes of a host and how each is started: the disk service (every disk of a VM
on this host, whatever serves it), the standalone relocation proxy, and the VM supervisor that owns a
VM's QEMU and its disk service. Each declares its control verbs in one way (:mod:`verbs`) and has a
named entry point (:mod:`entry`); the CLI only parses arguments and calls them."""
