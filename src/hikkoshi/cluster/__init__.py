"""The cluster's state in etcd: hosts under leases, one owner per VM, migration jobs, limits.

Layer 6 (DESIGN.md): it imports ``migrate.phases`` below it and nothing above; the agent builds on it.
etcd is reached through :class:`~hikkoshi.cluster.store.Store` only (the etcd3aio client over gRPC).

Modules, one idea each:

- ``config``: endpoints, TLS client certificates, timeouts (:class:`EtcdConfig`, :class:`EtcdTls`).
- ``etcd_process``: local etcd members as supervised children (``EtcdMember.single(state_dir)``, the
  embedded default; ``LocalCluster.loopback(dir, 3)``, for tests).
- ``store``: keys, prefixes, transactions, leases, watches; bounded retries; one
  :class:`EtcdUnavailable` naming the endpoints.
- ``txn``: transaction comparisons and operations as plain data.
- ``lease``: a lease kept alive by a task of the caller's block (``kept_lease``), and what the holder
  may conclude when cut off (:meth:`KeptLease.alive`).
- ``keys``, ``models``: the key schema and the JSON records (pydantic).
- ``hosts``: registration under a lease (``register_host``), listing up/down/maintenance.
- ``ownership``: owner keys, fencing tokens, unique names.
- ``jobs``: migration records, one coordinator under a lease, take-over, the commit point.
- ``slots`` (pure) and ``limits``: concurrency limits as counted slots, the FIFO queue.
- ``placement``: a stand-in "least-loaded fitting host" until the DRS planner exists.
- ``views`` and ``limit_settings`` (pure): what the CLI lists (hosts, VMs with owner and state,
  migrations, the queue, limits and holders) and how limits are written (``host-out=2``).
- ``etcd_supervisor`` and ``etcd_health``: ``hikkoshi cluster up`` (the embedded member, supervised)
  and ``cluster status`` (members, leader, health, key counts).
- ``tasks``: a background task for the length of a block.

How the agent will use it (one ``Store`` per agent process, shared by its tasks)::

    async with Store(EtcdConfig.of("10.0.0.1:2379,10.0.0.2:2379", tls=EtcdTls(ca, crt, key))) as store:
        async with register_host(store, info, measure_status) as registration:   # HostInfo, () -> HostStatus
            own, jobs, slots = Ownership(store), Jobs(store), Slots(store)

            claim = await own.create_vm(vm_record, host)      # NameTaken / OwnedElsewhere
            # ... before starting or resuming a QEMU, always:
            if not (await own.check_owner(uuid, host, claim.token)).ok: refuse
            # EtcdUnavailable here: start nothing; VMs already running keep running.

            # a migration from this host (the coordinator):
            async with kept_lease(store, ttl=10) as lease:     # the migration's lease
                record = JobRecord(id=job_id, vm=uuid, source=host, destination=dest)
                coord = await jobs.create(record, host, lease)
                needs = resources_for(host, dest, datastores=..., source_site=..., destination_site=...)
                await slots.acquire(job_id, needs, lease)   # waits in the FIFO queue (no_wait=True: refuse)
                await jobs.advance(coord, Phase.PREPARE)  ... Phase.SWITCHOVER
                dest_claim = await jobs.commit(coord, claim)  # phase resume-destination + owner key moved
                # the destination checks dest_claim.token with check_owner before it resumes
                await jobs.advance(coord, Phase.DONE)
            # leaving the block revokes the lease: coordinator key and slots go with it

            # on start-up, and when a coordinator's lease lapsed:
            for view in await jobs.list():
                if view.orphaned:
                    coord, view = await jobs.take_over(view.record.id, host, lease)
                    # view.recovery: "rollback" before the commit point, "finish" after it

Invariants this layer keeps (DESIGN.md): the owner key is created and moved only by transactions
that compare its revisions, so a VM has one owner; its mod revision is the fencing token every start
checks; nothing here ever stops a VM, and a host cut off from etcd learns so from
:class:`EtcdUnavailable` and lease states, not by losing its VMs.
"""
