"""The paying client: opens or tops up a channel, pays with vouchers, verifies every receipt it gets.

It never signs for more than it verified (issue 20, attack 1): after each answer the cumulative amount grows by
that receipt's price, and only once the price is checked against the registered price per 1k tokens (a ceiling:
the adapter's on chain; the base model's as the node listed it when first asked) and the receipt's token counts
(output within max_tokens, prompt within what the prompt's bytes can tokenize to). The node's `payCumulative`
is only compared: a node that asks for more is reported (`overcharges`, a warning), never paid. Each request
carries the client's signed RequestAuthorization, so nobody else can spend its channel (attack 8).

Its state (cumulative paid per channel, receipts received) lives in a small
JSON folder so a later `longtail submit` continues the same channels, and the
client can check later that each receipt is included in the node's log as
checkpointed on chain.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import weakref
from pathlib import Path
from typing import TextIO

import aiohttp
from eth_account.signers.local import LocalAccount
from web3 import Web3

from longtail.attribution.merkle import leaf_hash, verify_inclusion
from longtail.attribution.receipts import ReceiptDomain, SignedReceipt, keccak, verify_receipt
from longtail.contracts.channels import channel_id_of
from longtail.contracts.client import LongtailContracts
from longtail.contracts.deployment import Deployment
from longtail.contracts.vouchers import VoucherSigner
from longtail.node.payments import price_for_tokens
from longtail.node.requests import CHANNEL_HEADER, VOUCHER_AMOUNT_HEADER, VOUCHER_SIGNATURE_HEADER
from longtail.node.timing import HEADER as TIMING_HEADER
from longtail.node.timing import parse_server_timing
from longtail.node.vouchers import MAX_AUTHORIZATION_SECONDS, VoucherDomain, sign_request_authorization

log = logging.getLogger("longtail.client")
#: Tokens a chat template may add around the prompt's own (role markers, a default system prompt) per request and
#: per message; a byte-level tokenizer never makes more tokens of a text than it has UTF-8 bytes.
TEMPLATE_TOKENS, TEMPLATE_TOKENS_PER_MESSAGE = 96, 8
#: How long a client trusts a registered price it read from the chain before reading it again.
PRICE_CACHE_SECONDS = 60.0


class ClientError(RuntimeError):
    """A node refused or misbehaved; `status` and `body` say how."""

    def __init__(self, message: str, status: int | None = None, body: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.body = status, body or {}


@dataclasses.dataclass(frozen=True)
class Answer:
    """A verified answer. `latency_seconds` runs from sending the request to a verified receipt (voucher
    signing, HTTP and receipt checks included); `server_timing` is the node's Server-Timing, in ms."""

    text: str
    receipt: SignedReceipt
    node_url: str
    model: str
    latency_seconds: float
    server_timing: dict[str, float] = dataclasses.field(default_factory=dict)


def _close_all(files: list[TextIO]) -> None:
    for out in files:
        out.close()
    files.clear()


class ClientState:
    """Cumulative amounts per channel and the receipts received, in `folder`.

    Both files stay open: a client writes them after every answer, and reopening a file each time costs
    more than the rest of its bookkeeping.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._channels_file = folder / "channels.json"
        self.channels: dict[str, int] = json.loads(self._channels_file.read_text()) \
            if self._channels_file.exists() else {}
        self._channels_out: TextIO | None = None
        self._receipts_out: TextIO | None = None
        self._open: list[TextIO] = []
        self._closer = weakref.finalize(self, _close_all, self._open)  # a client dropped without close()

    def paid(self, channel_id: str) -> int:
        return self.channels.get(channel_id, 0)

    def add_charge(self, channel_id: str, price: int) -> int:
        """Add one verified receipt's price to what the channel owes; returns the new cumulative amount."""
        owed = self.paid(channel_id) + price
        self.set_owed(channel_id, owed)
        return owed

    def set_owed(self, channel_id: str, cumulative: int) -> None:
        owed = max(cumulative, self.paid(channel_id))
        if owed == self.channels.get(channel_id):
            return
        self.channels[channel_id] = owed
        if self._channels_out is None:
            self._channels_out = self._keep_open(self._channels_file, "w")
        self._channels_out.seek(0)
        self._channels_out.write(json.dumps(self.channels, indent=2))
        self._channels_out.truncate()
        self._channels_out.flush()

    def remember(self, answer: Answer) -> None:
        if self._receipts_out is None:
            self._receipts_out = self._keep_open(self.folder / "receipts.jsonl", "a")
        self._receipts_out.write(json.dumps({"node_url": answer.node_url, "model": answer.model,
                                             "body": answer.receipt.to_json()}) + "\n")
        self._receipts_out.flush()

    def _keep_open(self, path: Path, mode: str) -> TextIO:
        out = path.open(mode)
        self._open.append(out)
        return out

    def close(self) -> None:
        _close_all(self._open)  # the finalizer stays armed: writing again reopens the files
        self._channels_out = self._receipts_out = None

    def receipts(self) -> list[tuple[str, SignedReceipt]]:
        path = self.folder / "receipts.jsonl"
        if not path.exists():
            return []
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [(row["node_url"], SignedReceipt.from_json(row["body"])) for row in rows]


class PayingClient:
    def __init__(self, account: LocalAccount, rpc_url: str, deployment: Deployment, state_dir: Path) -> None:
        self.account = account
        self.deployment = deployment
        self.contracts = LongtailContracts.connect(Web3(Web3.HTTPProvider(rpc_url)), deployment)
        self.state = ClientState(state_dir)
        self.domain = ReceiptDomain(chain_id=deployment.chain_id, verifying_contract=deployment.ledger)
        self.vouchers = VoucherDomain(deployment.chain_id, deployment.channels)
        self._voucher_signer = VoucherSigner(self.vouchers, account.key)
        self._addresses: dict[str, str] = {}
        self._base_prices: dict[str, int] = {}  # node URL -> its base model's listed price per 1k tokens
        self._prices: dict[str, tuple[float, int]] = {}  # adapter id -> (read at, registered price per 1k tokens)
        #: (node URL, what the node asked for, what the client owed by its own count) for every node that asked more.
        self.overcharges: list[tuple[str, int, int]] = []

    def channel_for(self, node_address: str) -> str:
        return channel_id_of(self.account.address, node_address)

    def ensure_deposit(self, node_address: str, needed: int, top_up: int) -> str:
        """Open or top up the channel (with an EIP-2612 permit: one transaction) so `needed` more is covered."""
        channel_id = self.channel_for(node_address)
        info = self.contracts.channels.get_channel(channel_id)
        owed = self.state.paid(channel_id)
        if info.deposit - owed < needed:
            self.contracts.channels.deposit_with_permit(self.account, node_address, max(top_up, needed),
                                                        int(time.time()) + 3600)
        return channel_id

    def _voucher_headers(self, channel_id: str, body: dict | None = None) -> dict[str, str]:
        """The channel, the voucher for everything verified so far and, for a request `body`, its authorization."""
        amount = self.state.paid(channel_id)
        headers = {CHANNEL_HEADER: channel_id}
        if body is not None:
            headers.update(self.authorize(channel_id, body).headers())
        if amount > 0:
            voucher = self._voucher_signer.sign(channel_id, amount)
            headers[VOUCHER_AMOUNT_HEADER] = str(amount)
            headers[VOUCHER_SIGNATURE_HEADER] = voucher.signature
        return headers

    def authorize(self, channel_id: str, body: dict):
        """The channel client's signature over one request body (model, prompt, max_tokens), fresh nonce."""
        return sign_request_authorization(self._voucher_signer, channel_id, body["model"],
                                          keccak(prompt_text_of(body).encode("utf-8")), int(body.get("max_tokens", 16)),
                                          int(time.time()) + MAX_AUTHORIZATION_SECONDS // 2)

    def registered_price(self, adapter_id: str) -> int:
        """An adapter's price per 1k tokens as registered on chain (cached briefly)."""
        cached = self._prices.get(adapter_id)
        if cached is None or time.monotonic() - cached[0] > PRICE_CACHE_SECONDS:
            cached = (time.monotonic(), self.contracts.registry.get_adapter(adapter_id).price_per_1k_tokens)
            self._prices[adapter_id] = cached
        return cached[1]

    async def base_price(self, session: aiohttp.ClientSession, url: str) -> int:
        """The base model's price per 1k tokens as the node listed it when first asked (kept for the session)."""
        if url not in self._base_prices:
            async with session.get(f"{url}/v1/models") as response:
                models = (await response.json())["data"]
            base = [m for m in models if not m.get("adapter_id") or int(str(m["adapter_id"]), 16) == 0]
            if not base:
                raise ClientError(f"{url} lists no base model price")
            self._base_prices[url] = int(base[0]["price_per_1k_tokens"])
        return self._base_prices[url]

    async def check_price(self, session: aiohttp.ClientSession, url: str, body: dict, receipt) -> int:
        """The receipt's price if it is what the registered price and the request's own bounds allow; else raise."""
        if int(receipt.adapter_id, 16) == 0:
            per_1k = await self.base_price(session, url)
        else:
            per_1k = self.registered_price(receipt.adapter_id)
        max_tokens = int(body.get("max_tokens", 16))
        prompt = prompt_text_of(body)
        messages = len(body.get("messages") or ())
        prompt_bound = len(prompt.encode("utf-8")) + TEMPLATE_TOKENS + TEMPLATE_TOKENS_PER_MESSAGE * messages
        if receipt.output_tokens > max_tokens or receipt.prompt_tokens > prompt_bound:
            raise ClientError(f"receipt from {url} counts {receipt.prompt_tokens}+{receipt.output_tokens} tokens; "
                              f"the request allows at most {prompt_bound}+{max_tokens}: not paid")
        # The registered price is a ceiling: a node may charge less for an adapter, never more.
        ceiling = price_for_tokens(per_1k, receipt.prompt_tokens + receipt.output_tokens)
        if receipt.price > ceiling:
            raise ClientError(f"receipt from {url} charges {receipt.price}; {per_1k} per 1k tokens over "
                              f"{receipt.prompt_tokens + receipt.output_tokens} tokens is at most {ceiling}: not paid")
        return receipt.price

    async def node_address(self, session: aiohttp.ClientSession, url: str) -> str:
        """The address a node URL claims (cached); every receipt from it must be signed by that key."""
        if url not in self._addresses:
            async with session.get(f"{url}/healthz") as response:
                self._addresses[url] = (await response.json())["node"]
        return self._addresses[url]

    async def ask(self, session: aiohttp.ClientSession, url: str, model: str, prompt: str,
                  max_tokens: int = 32, temperature: float = 0.0) -> Answer:
        """One paid chat completion; the receipt is verified before the answer is returned."""
        node = await self.node_address(session, url)
        channel_id = self.channel_for(node)
        body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                "temperature": temperature}
        started = time.perf_counter()
        async with session.post(f"{url}/v1/chat/completions", json=body,
                                headers=self._voucher_headers(channel_id, body)) as response:
            payload = await response.json()
            if response.status != 200:
                message = payload.get("error", {}).get("message", str(payload))
                raise ClientError(f"{url} answered {response.status}: {message}", response.status, payload)
            timing = parse_server_timing(response.headers.get(TIMING_HEADER))
        signed = SignedReceipt.from_json(payload["longtail"])
        verify_receipt(signed, self.domain, expected_signer=node)
        text = payload["choices"][0]["message"]["content"]
        receipt = signed.receipt
        if receipt.channel_id != channel_id or receipt.client.lower() != self.account.address.lower():
            raise ClientError(f"receipt from {url} names another channel or client")
        if "0x" + keccak(text.encode("utf-8")).hex() != receipt.output_hash:
            raise ClientError(f"receipt from {url} does not hash the answer it came with")
        if "0x" + keccak(prompt_text_of(body).encode("utf-8")).hex() != receipt.prompt_hash:
            raise ClientError(f"receipt from {url} is for another prompt")
        price = await self.check_price(session, url, body, receipt)
        answer = Answer(text=text, receipt=signed, node_url=url, model=model,
                        latency_seconds=time.perf_counter() - started, server_timing=timing)
        # Bookkeeping of a verified answer (files on disk), after its latency is taken. What the node says it is
        # owed is only compared, never signed (issue 20, attack 1).
        owed = self.state.add_charge(channel_id, price)
        asked = _int_or_none(payload["longtail"].get("payCumulative"))
        if asked is not None and asked > owed:
            self.overcharges.append((url, asked, owed))
            log.warning("%s asks for a cumulative %d on channel %s; its verified receipts add up to %d: the client "
                        "pays %d", url, asked, channel_id, owed, owed)
        self.state.remember(answer)
        return answer

    async def fetch_receipt(self, session: aiohttp.ClientSession, url: str, request_id: str) -> SignedReceipt:
        """The node's current body of a receipt, verified; it carries the adapter credit once computed."""
        node = await self.node_address(session, url)
        async with session.get(f"{url}/v1/receipts/{request_id}") as response:
            payload = await response.json()
            if response.status != 200:
                raise ClientError(f"{url} has no receipt {request_id}: {payload}", response.status, payload)
        signed = SignedReceipt.from_json(payload)
        verify_receipt(signed, self.domain, expected_signer=node)
        return signed

    async def settle(self, session: aiohttp.ClientSession, url: str) -> int:
        """Send the voucher for everything served so far (the last answer's price included)."""
        node = await self.node_address(session, url)
        channel_id = self.channel_for(node)
        amount = self.state.paid(channel_id)
        if amount == 0:
            return 0
        voucher = self._voucher_signer.sign(channel_id, amount)
        async with session.post(f"{url}/v1/vouchers", json=voucher.to_json()) as response:
            if response.status != 200:
                raise ClientError(f"{url} refused the voucher: {await response.text()}", response.status)
        return amount

    async def check_inclusion(self, session: aiohttp.ClientSession, url: str, signed: SignedReceipt) -> bool | None:
        """True when the receipt is proven in the node's latest on-chain checkpoint; None when not yet covered."""
        checkpoint = self.contracts.ledger.latest_checkpoint(signed.receipt.node)
        if signed.receipt.seq >= checkpoint.tree_size:
            return None
        params = {"seq": signed.receipt.seq, "size": checkpoint.tree_size}
        async with session.get(f"{url}/v1/log/proof", params=params) as response:
            proof = await response.json()
        try:
            verify_inclusion(signed.receipt.seq, checkpoint.tree_size, leaf_hash(signed.digest),
                             [bytes.fromhex(p[2:]) for p in proof["proof"]], bytes.fromhex(checkpoint.root_hash[2:]))
        except Exception:
            return False
        return True


def prompt_text_of(body: dict) -> str:
    """What the node hashes into the receipt's promptHash: the prompt, or the messages as canonical JSON."""
    if body.get("messages") is not None:
        return json.dumps(list(body["messages"]), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return body["prompt"]


def _int_or_none(value) -> int | None:
    try:
        return int(str(value))
    except ValueError:
        return None
