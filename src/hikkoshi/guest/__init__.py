"""The test guest: a Debian kernel and a busybox initramfs carrying workloads that check themselves.

A kit beside the layers, not one of them: the agent, the command line, the tests and the benchmarks
use it to make VMs worth migrating; nothing in ``nbd``, ``block``, ``vm``, ``migrate`` or ``lab``
depends on it.
"""
