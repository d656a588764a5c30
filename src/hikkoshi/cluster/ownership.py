"""One owner per VM: the owner key, moved only by transactions, and its revision as a fencing token.

Every VM has exactly one key ``owners/<uuid>`` naming the host that runs it. It is

- created by a transaction that requires it absent (``create_revision == 0``), together with the
  VM's record and its name (``names/<name>``, so names are unique cluster-wide): of any number of
  concurrent creators or claimers exactly one wins, and the others are told who holds it;
- moved only by a transaction that requires its mod revision to equal the token the mover holds: a
  mover with a stale token (the key moved since) is refused and told who holds it now;
- never leased: a host cut off from etcd still owns its VMs (and keeps them running).

The key's mod revision is the **fencing token**. An agent resumes or starts a VM only after
:meth:`Ownership.check_owner` says the key names it with the token it holds (a linearizable read:
no move that completed before the check can be missed); any error, :class:`EtcdUnavailable`
included, means: start nothing.

Retries: every transaction here writes a nonce (``Owner.claim``); when the answer to a write is lost
and the replay finds the comparison false, the key still carrying our nonce says the first attempt
won.
"""

from __future__ import annotations

import enum
import uuid as uuidlib
from dataclasses import dataclass

from hikkoshi.cluster import txn as t
from hikkoshi.cluster.errors import NameTaken, OwnedElsewhere, VmExists
from hikkoshi.cluster.keys import Keys
from hikkoshi.cluster.models import Owner, VmRecord
from hikkoshi.cluster.store import KeyValue, Store


@dataclass(frozen=True)
class Claim:
    """A host's ownership of a VM, as of ``token`` (the owner key's mod revision)."""

    uuid: str
    host: str
    token: int


class OwnerState(enum.Enum):
    """What :meth:`Ownership.check_owner` found."""

    OWNER = "owner"
    """The key names this host with this token: go ahead."""
    MOVED = "moved"
    """The key names another host, or this host with another token: do not run the VM."""
    NO_OWNER = "no-owner"
    """No owner key: the VM is not (or no longer) the cluster's."""


@dataclass(frozen=True)
class OwnerCheck:
    """The answer of :meth:`Ownership.check_owner`: the state and the key as it is now."""

    state: OwnerState
    holder: str | None
    token: int

    @property
    def ok(self) -> bool:
        return self.state is OwnerState.OWNER


@dataclass(frozen=True)
class VmView:
    """A VM with its owner, read at one revision."""

    vm: VmRecord
    owner: str | None
    token: int


def _owner(kv: KeyValue | None) -> Owner | None:
    return Owner.from_bytes(kv.value) if kv else None


def _first(reads: tuple[KeyValue, ...]) -> KeyValue | None:
    return reads[0] if reads else None


class Ownership:
    """VM records, names and owner keys."""

    def __init__(self, store: Store, keys: Keys | None = None) -> None:
        self.store = store
        self.keys = keys or Keys()

    async def create_vm(self, vm: VmRecord, host: str) -> Claim:
        """Register a new VM owned by ``host``: record, unique name and owner key in one transaction.

        :class:`NameTaken` if another VM has the name; :class:`OwnedElsewhere` if the uuid is owned;
        :class:`VmExists` if the uuid is registered without an owner.
        """
        k = self.keys
        nonce = uuidlib.uuid4().hex
        owner = Owner(host=host, claim=nonce)
        name_key, vm_key, owner_key = k.name(vm.name), k.vm(vm.uuid), k.owner(vm.uuid)
        r = await self.store.txn(
            [t.Compare.absent(name_key), t.Compare.absent(vm_key), t.Compare.absent(owner_key)],
            [
                t.Put(name_key, vm.uuid.encode()),
                t.Put(vm_key, vm.to_bytes()),
                t.Put(owner_key, owner.to_bytes()),
            ],
            [t.Get(name_key), t.Get(vm_key), t.Get(owner_key)],
        )
        if r.succeeded:
            return Claim(vm.uuid, host, r.revision)
        named, recorded, owned = (_first(x) for x in r.reads)
        held = _owner(owned)
        if owned is not None and held is not None:
            if held.claim == nonce:  # our own earlier attempt, whose answer was lost
                return Claim(vm.uuid, host, owned.mod_revision)
            raise OwnedElsewhere(vm.uuid, held.host, owned.mod_revision)
        if named is not None and named.value.decode() != vm.uuid:
            raise NameTaken(vm.name, named.value.decode())
        if recorded is not None:
            raise VmExists(f"VM {vm.uuid} is already registered")
        raise NameTaken(vm.name, vm.uuid)  # the name is ours but the VM is not: a half-removed VM

    async def claim(self, uuid: str, host: str) -> Claim:
        """Become the owner of a registered VM that has none. :class:`OwnedElsewhere` if it has one."""
        k = self.keys
        nonce = uuidlib.uuid4().hex
        owner_key = k.owner(uuid)
        r = await self.store.txn(
            [t.Compare.absent(owner_key), t.Compare(k.vm(uuid), t.Target.CREATE, t.Op.GREATER, 0)],
            [t.Put(owner_key, Owner(host=host, claim=nonce).to_bytes())],
            [t.Get(owner_key)],
        )
        if r.succeeded:
            return Claim(uuid, host, r.revision)
        return self._resolved(uuid, host, nonce, _first(r.reads[0]))

    async def move(self, claim: Claim, to_host: str) -> Claim:
        """Move the owner key to ``to_host``, if it has not moved since ``claim.token``.

        The new claim's token is what ``to_host`` must present to :meth:`check_owner`.
        :class:`OwnedElsewhere` (who holds it, and the current token) if the token is stale.
        """
        nonce = uuidlib.uuid4().hex
        owner_key = self.keys.owner(claim.uuid)
        r = await self.store.txn(
            [t.Compare.modified_at(owner_key, claim.token)],
            [t.Put(owner_key, Owner(host=to_host, claim=nonce).to_bytes())],
            [t.Get(owner_key)],
        )
        if r.succeeded:
            return Claim(claim.uuid, to_host, r.revision)
        return self._resolved(claim.uuid, to_host, nonce, _first(r.reads[0]))

    def _resolved(self, uuid: str, host: str, nonce: str, kv: KeyValue | None) -> Claim:
        """After a refused write: ours after all (a lost answer, replayed), or who holds the key."""
        held = _owner(kv)
        if kv is None or held is None:
            raise OwnedElsewhere(uuid, None, 0)
        if held.claim == nonce:
            return Claim(uuid, host, kv.mod_revision)
        raise OwnedElsewhere(uuid, held.host, kv.mod_revision)

    async def owner(self, uuid: str) -> Claim | None:
        """Who owns the VM now, with the current token."""
        kv = await self.store.get(self.keys.owner(uuid))
        held = _owner(kv)
        return Claim(uuid, held.host, kv.mod_revision) if kv and held else None

    async def check_owner(self, uuid: str, host: str, token: int) -> OwnerCheck:
        """Whether ``host`` owns the VM with ``token`` now. Call it right before resuming a QEMU.

        :class:`EtcdUnavailable` when etcd does not answer: the caller must then start nothing.
        """
        kv = await self.store.get(self.keys.owner(uuid))
        held = _owner(kv)
        if kv is None or held is None:
            return OwnerCheck(OwnerState.NO_OWNER, None, 0)
        state = OwnerState.OWNER if held.host == host and kv.mod_revision == token else OwnerState.MOVED
        return OwnerCheck(state, held.host, kv.mod_revision)

    async def require_owner(self, uuid: str, host: str, token: int) -> None:
        """:meth:`check_owner`, raising :class:`OwnedElsewhere` unless ``host`` owns it with ``token``."""
        check = await self.check_owner(uuid, host, token)
        if not check.ok:
            raise OwnedElsewhere(uuid, check.holder, check.token)

    async def remove_vm(self, claim: Claim) -> None:
        """Forget the VM (record, name, owner key), if ``claim`` is still current."""
        k = self.keys
        vm = await self.vm(claim.uuid)
        actions: list[t.Action] = [t.Delete(k.owner(claim.uuid)), t.Delete(k.vm(claim.uuid))]
        compare = [t.Compare.modified_at(k.owner(claim.uuid), claim.token)]
        if vm is not None:
            actions.append(t.Delete(k.name(vm.name)))
            compare.append(t.Compare.value_is(k.name(vm.name), claim.uuid.encode()))
        r = await self.store.txn(compare, actions, [t.Get(k.owner(claim.uuid))])
        if not r.succeeded:
            kv = _first(r.reads[0])
            held = _owner(kv)
            if kv is None:
                return  # already gone: our replayed removal
            raise OwnedElsewhere(claim.uuid, held.host if held else None, kv.mod_revision)

    async def vm(self, uuid: str) -> VmRecord | None:
        """The VM's record."""
        kv = await self.store.get(self.keys.vm(uuid))
        return VmRecord.from_bytes(kv.value) if kv else None

    async def uuid_of(self, name: str) -> str | None:
        """The uuid of the VM called ``name``."""
        kv = await self.store.get(self.keys.name(name))
        return kv.value.decode() if kv else None

    async def list_vms(self, *, limit: int = 0) -> list[VmView]:
        """VMs with their owners (at most ``limit`` when not 0), in uuid order, read at one revision."""
        vms = await self.store.get_prefix(self.keys.vms, limit=limit)
        if not vms.kvs:
            return []
        first, last = Keys.last(vms.kvs[0].key), Keys.last(vms.kvs[-1].key)
        owners = await self.store.get_range(
            self.keys.owner(first), self.keys.owner(last), revision=vms.revision
        )
        by_uuid = {Keys.last(kv.key): kv for kv in owners.kvs}
        out = []
        for kv in vms.kvs:
            vm = VmRecord.from_bytes(kv.value)
            okv = by_uuid.get(vm.uuid)
            held = _owner(okv)
            out.append(VmView(vm, held.host if held else None, okv.mod_revision if okv else 0))
        return out
