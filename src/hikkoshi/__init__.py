"""hikkoshi: live migration of running QEMU/KVM virtual machines."""

__version__ = "0.1.0"
