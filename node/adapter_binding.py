"""Serve a registered adapter for pay only when its registration is the one its trainer declared (issue 20, attack 5).

Anyone who fetches an adapter's bytes can register its adapterId first, naming themselves and no Datanets, and
the ledger pays an adapter's owner share to whoever the Registry names. The chain cannot hash megabytes of
weights, so it cannot tell the trainer from a squatter; the adapter can. Its `adapter_config.json` carries a
`longtail` object (owner, Datanet shares: serving.peft_format.OwnerDeclaration) inside the bytes the adapterId
hashes, so nobody can change it without changing the id. A node compares it with the Registry before every paid
request (cached briefly) and refuses with `AdapterOwnerConflict` (409) when they differ: a squatter's
registration earns nothing, because no honest node serves the adapter under it. docs/security.md.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from longtail.node.catalog import CatalogEntry
from longtail.node.errors import AdapterOwnerConflict, AdapterUnavailable
from longtail.serving.peft_format import AdapterRejected, OwnerDeclaration, read_declaration

log = logging.getLogger("longtail.node")

# A registration changes only by `transferAdapter`; a node notices one (or a first registration) within this.
BINDING_CACHE_SECONDS = 30.0

ReadRegistration = Callable[[str], Awaitable[object]]  # ChainGateway.adapter_registration -> AdapterInfo


def binding_problem(adapter_id: str, declaration: OwnerDeclaration | None, registration,
                    local_shares: tuple[tuple[str, int], ...]) -> str | None:
    """Why this adapter must not be served for pay under this registration; None when it may."""
    if declaration is None:
        return (f"adapter {adapter_id} declares no owner (no `longtail` object in its adapter_config.json): "
                "this node serves it for pay only when its trainer's declaration binds it to its registration")
    if tuple(sorted(local_shares)) != declaration.datanets:
        return (f"adapter {adapter_id}: the Datanet shares of its safetensors metadata {list(local_shares)} differ "
                f"from those its config declares {list(declaration.datanets)}")
    if not registration.registered:
        return (f"adapter {adapter_id} is not registered on chain: its owner, {declaration.owner}, registers it "
                "first (revenue for an unregistered id would go to whoever registers it)")
    if registration.owner.lower() != declaration.owner.lower():
        return (f"adapter {adapter_id} is registered on chain by {registration.owner}, but its config declares "
                f"{declaration.owner} as its owner: refused so that a squatted registration earns nothing")
    registered_shares = tuple(sorted((d.lower(), int(bps)) for d, bps in registration.datanet_shares))
    if registered_shares != declaration.datanets:
        return (f"adapter {adapter_id} is registered with Datanet shares {list(registered_shares)}, but its config "
                f"declares {list(declaration.datanets)}")
    return None


class AdapterBindings:
    """The node's check, per adapterId: declaration read once (content-addressed), registration re-read after a TTL."""

    def __init__(self, read_registration: ReadRegistration, ttl: float = BINDING_CACHE_SECONDS) -> None:
        self.read_registration = read_registration
        self.ttl = ttl
        self._declarations: dict[str, OwnerDeclaration | None] = {}
        self._verdicts: dict[str, tuple[float, str | None]] = {}

    async def check(self, entry: CatalogEntry) -> None:
        """Raise `AdapterOwnerConflict` unless `entry` may be served for pay; the base model always may."""
        if entry.adapter_id is None:
            return
        adapter_id = entry.adapter_id.lower()
        cached = self._verdicts.get(adapter_id)
        if cached is None or time.monotonic() - cached[0] > self.ttl:
            cached = (time.monotonic(), await self._verdict(adapter_id, entry))
            self._verdicts[adapter_id] = cached
            if cached[1]:
                log.warning("refusing adapter %s: %s", adapter_id, cached[1])
        if cached[1]:
            raise AdapterOwnerConflict(cached[1], param="model")

    async def _verdict(self, adapter_id: str, entry: CatalogEntry) -> str | None:
        if adapter_id not in self._declarations:
            if entry.path is None:
                return f"adapter {adapter_id} has no files on this node to read its owner declaration from"
            try:
                self._declarations[adapter_id] = await asyncio.to_thread(read_declaration, entry.path)
            except AdapterRejected as error:
                return f"adapter {adapter_id}: {error}"
        try:
            registration = await self.read_registration(adapter_id)
        except Exception as error:  # a ChainError or a broken connection: not the client's fault, not cached long
            self._verdicts.pop(adapter_id, None)
            raise AdapterUnavailable(f"cannot read adapter {adapter_id}'s registration right now "
                                     f"({type(error).__name__}); retry later", param="model",
                                     retry_after_seconds=5) from None
        local = tuple((d.datanet_id.lower(), d.share_bps) for d in entry.datanets)
        return binding_problem(adapter_id, self._declarations[adapter_id], registration, local)


class DeclarationMismatch(ValueError):
    """A registration about to be sent differs from what the adapter declares: it would never be served for pay."""


def check_before_registering(adapter_dir, owner: str, datanet_shares) -> OwnerDeclaration:
    """Refuse to register an adapter under an owner or Datanet shares its config does not declare.

    Such a registration is either a squat or a mistake; either way no node would serve it for pay.
    """
    declaration = read_declaration(adapter_dir)
    if declaration is None:
        raise DeclarationMismatch(f"{adapter_dir}: adapter_config.json declares no owner; retrain with "
                                  "`longtail train --owner <address>` (docs/security.md, attack 5)")
    if declaration.owner.lower() != owner.lower():
        raise DeclarationMismatch(f"{adapter_dir}: declared owner is {declaration.owner}, not {owner}: refusing "
                                  "to register someone else's adapter")
    shares = tuple(sorted((str(d).lower(), int(bps)) for d, bps in datanet_shares))
    if shares != declaration.datanets:
        raise DeclarationMismatch(f"{adapter_dir}: Datanet shares {list(shares)} differ from the declared "
                                  f"{list(declaration.datanets)}")
    return declaration
