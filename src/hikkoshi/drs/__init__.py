"""DRS: where VMs should run. Pure functions from a cluster snapshot to moves with reasons.

- :func:`hikkoshi.drs.planner.plan`: maintenance evacuations, rule repairs, Storage DRS, load balancing;
- :func:`hikkoshi.drs.placement.place`: a host for a new VM;
- :func:`hikkoshi.drs.maintenance.evacuate`: empty hosts for maintenance;
- :func:`hikkoshi.drs.storage.storage_plan`: Storage DRS alone;
- :mod:`hikkoshi.drs.schedule`: migrations at a time or in recurring windows;
- :mod:`hikkoshi.drs.simulator`: plans applied round after round, with their predicted costs.

The snapshot (:mod:`hikkoshi.drs.model`) is built by the cluster service from etcd and the agents'
measurements; nothing here does I/O.
"""
