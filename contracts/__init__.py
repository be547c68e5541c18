"""Longtail's contracts: Solidity sources (src/), compiled artifacts (build/) and the Python handle.

`deploy_all(w3, deployer)` deploys the set; `LongtailContracts.connect(w3, deployment)` wraps it;
`contracts.vouchers` signs and recovers payment vouchers without a chain.
"""

from contracts.deployment import Deployment, DeployParams, deploy_all

__all__ = ["DeployParams", "Deployment", "deploy_all"]
