"""Migrations of running VMs between hosts: prechecks, phases, convergence, storage modes, reports."""
