"""One handle on a deployed Longtail contract set: `LongtailContracts.connect(w3, deployment)`."""

from __future__ import annotations

import dataclasses

from web3 import Web3

from longtail.contracts.channels import PaymentChannels
from longtail.contracts.deployment import Deployment
from longtail.contracts.ledger import AttributionLedger
from longtail.contracts.registry import Registry
from longtail.contracts.token import OpenToken


class WrongChain(RuntimeError):
    """The RPC endpoint serves another chain than the deployment was made on."""

    def __init__(self, expected: int, actual: int) -> None:
        super().__init__(f"deployment is on chain {expected}, but the RPC endpoint serves chain {actual}")
        self.expected, self.actual = expected, actual


@dataclasses.dataclass(frozen=True)
class LongtailContracts:
    """Typed wrappers of the four contracts of one deployment."""

    w3: Web3
    deployment: Deployment
    token: OpenToken
    registry: Registry
    channels: PaymentChannels
    ledger: AttributionLedger

    @classmethod
    def connect(cls, w3: Web3, deployment: Deployment) -> LongtailContracts:
        chain_id = w3.eth.chain_id
        if chain_id != deployment.chain_id:
            raise WrongChain(deployment.chain_id, chain_id)
        token = OpenToken(w3, deployment.token)
        return cls(w3=w3, deployment=deployment, token=token,
                   registry=Registry(w3, deployment.registry, token),
                   channels=PaymentChannels(w3, deployment.channels, token),
                   ledger=AttributionLedger(w3, deployment.ledger, token))
