"""Thousands of adapters under byte budgets: Zipf traffic through the store and the tiers.

Generates N adapters (ranks 4-64, mixed target sets) for the embedded base model
with safetensors directly, imports them into a content-addressed store (full
validation), then replays Zipf-distributed requests (alpha 0.8 and 1.2) with device
and host budgets well below the total adapter bytes, and measures in the same run
the same request count over only 10 adapters (the baseline). Reports throughput
ratio, cold-load latency p50/p99 (admission -> usable device slot, from disk),
hit rate per tier, the time `poll()` takes on the step loop, and peak RSS against
the budgets. Writes the table to docs/benchmarks.md between the adapters markers.

Two drivers:
- `replay` (always): a continuous-batching loop in the scheduler's shape (admit,
  prefetch, wait for a slot, pin, decode for the request's output length, unpin)
  whose model step is a fixed compute time, and whose device slots are real
  preallocated buffers the factors are copied into. It isolates what the tiers cost.
- `engine` (when `serving.Engine` is importable): the real engine on the base
  model, `generate` over the same traces.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]

import torch  # noqa: E402

from longtail.scripts.docs_section import write_section  # noqa: E402
from longtail.serving.adapter_metrics import AdapterMetrics, quantile  # noqa: E402
from longtail.serving.adapter_store import AdapterStore  # noqa: E402
from longtail.serving.adapter_tiers import SlotsFull, TieredAdapters  # noqa: E402
from longtail.serving.base_models import embedded_model_dir, longtail_home  # noqa: E402
from longtail.serving.peft_format import AdapterWeights, ModuleShapes, write_random_adapter  # noqa: E402

RANKS = (4, 8, 16, 32, 64)
RANK_WEIGHTS = (0.3, 0.3, 0.2, 0.12, 0.08)  # small ranks are the common case in practice
TARGET_SETS = (
    ("q_proj", "v_proj"),
    ("q_proj", "k_proj", "v_proj", "o_proj"),
    ("gate_proj", "up_proj", "down_proj"),
    ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
)
TARGET_WEIGHTS = (0.4, 0.3, 0.15, 0.15)
MIB = 1 << 20
NOTE_HTTP = ("Peak RSS of the HTTP rows is the whole benchmark process after the earlier runs (replays, the other engine's run): memory freed by an engine that was shut down stays in the allocator, so it bounds the node from above rather than measuring it; a node's own figure is its base model and KV pool, the host budget, the device budget (the slot buffers on CPU) and the runtime. The ratios move by ±0.3 between runs on a shared 2-core machine (load average {load} at the end of this run): the 10-adapter baselines are as noisy as the 1,000-adapter runs.")


class BufferSlots:
    """Device slots as one preallocated buffer of `capacity_bytes`, cut into adapter-sized extents.

    Loads copy every factor into the buffer (the copy the engine's slots make); freed extents
    are reused first-fit, so the buffer never grows: peak memory is the budget.
    """

    def __init__(self, capacity_bytes: int, dtype: torch.dtype, device: str):
        self.element = torch.empty((), dtype=dtype).element_size()
        self.buffer = torch.zeros(capacity_bytes // self.element, dtype=dtype, device=device)
        self.free_extents: list[tuple[int, int]] = [(0, self.buffer.numel())]
        self.extents: dict[int, tuple[int, int]] = {}
        self.slot_of: dict[str, int] = {}
        self.next_slot = 0

    def load(self, weights: AdapterWeights) -> int:
        need = sum(m.lora_a.numel() + m.lora_b.numel() for m in weights.modules)
        for index, (start, length) in enumerate(self.free_extents):
            if length >= need:
                self.free_extents[index] = (start + need, length - need)
                break
        else:
            raise SlotsFull(weights.adapter_id, len(self.slot_of))  # no free extent of `need` elements
        offset = start
        for module in weights.modules:
            for factor in (module.lora_a, module.lora_b):
                self.buffer[offset:offset + factor.numel()].copy_(factor.reshape(-1), non_blocking=True)
                offset += factor.numel()
        slot, self.next_slot = self.next_slot, self.next_slot + 1
        self.extents[slot] = (start, need)
        self.slot_of[weights.adapter_id] = slot
        return slot

    def free(self, adapter_id: str) -> None:
        start, length = self.extents.pop(self.slot_of.pop(adapter_id))
        # Merge with neighbours so the buffer does not fragment into unusable slivers.
        extents = sorted(self.free_extents + [(start, length)])
        merged = [extents[0]]
        for s, n in extents[1:]:
            last_s, last_n = merged[-1]
            if last_s + last_n == s:
                merged[-1] = (last_s, last_n + n)
            else:
                merged.append((s, n))
        self.free_extents = [e for e in merged if e[1] > 0]


@dataclass(frozen=True)
class Request:
    adapter: int
    prompt_tokens: int
    output_tokens: int


def prepare_adapters(work_dir: Path, count: int, shapes: ModuleShapes, seed: int) -> tuple[AdapterStore, list[str]]:
    """Generate (fp16 on disk) and import `count` adapters; cached in work_dir across runs."""
    store = AdapterStore(work_dir / "home")
    manifest_path = work_dir / f"adapters-{count}-{seed}.json"
    if manifest_path.exists():
        ids = json.loads(manifest_path.read_text())
        if all(i in store for i in ids):
            return store, ids
    rng = random.Random(seed)
    ids = []
    started = time.perf_counter()
    for i in range(count):
        rank = rng.choices(RANKS, RANK_WEIGHTS)[0]
        targets = rng.choices(TARGET_SETS, TARGET_WEIGHTS)[0]
        folder = work_dir / "src" / f"a{i:04d}"
        write_random_adapter(folder, shapes, rank, targets, seed=seed * 100_000 + i, std=0.01,
                             dtype=torch.float16)
        ids.append(store.add(folder, shapes, name=f"bench-{i:04d}").adapter_id)
        for file in folder.iterdir():  # the store holds its own copy
            file.unlink()
        folder.rmdir()
        if (i + 1) % 100 == 0:
            print(f"  imported {i + 1}/{count} adapters ({(i + 1) / (time.perf_counter() - started):.1f}/s)",
                  flush=True)
    manifest_path.write_text(json.dumps(ids))
    return store, ids


def zipf_trace(adapters: int, requests: int, alpha: float, seed: int) -> list[Request]:
    """Requests whose adapter popularity follows Zipf(alpha), popularity independent of adapter size."""
    rng = random.Random(seed)
    order = list(range(adapters))
    rng.shuffle(order)
    weights = [1.0 / (k + 1) ** alpha for k in range(adapters)]
    picks = rng.choices(order, weights, k=requests)
    return [Request(p, rng.randint(16, 64), rng.randint(16, 64)) for p in picks]


def reset_peak_rss() -> None:
    """Reset VmHWM (Linux >= 4.0) so each run reports its own peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def rss_mib(field: str = "VmHWM") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass(frozen=True)
class ReplayResult:
    tokens_per_s: float
    wall_s: float
    device_hit_rate: float
    host_hit_rate: float
    cold_p50_ms: float
    cold_p99_ms: float
    cold_loads: int
    poll_p99_ms: float
    evictions: dict
    peak_rss_mib: float
    rss_before_mib: float


def replay(store: AdapterStore, ids: list[str], trace: list[Request], shapes: ModuleShapes, *, device_budget: int,
           host_budget: int, max_batch: int, step_s: float, dtype: torch.dtype, device: str,
           starvation_s: float = 1.0) -> ReplayResult:
    """Continuous batching over the trace with the tiers; the model step is a fixed compute time."""
    slots = BufferSlots(device_budget, dtype, device)
    tiers = TieredAdapters(store, shapes, slots, device_budget_bytes=device_budget, host_budget_bytes=host_budget,
                           dtype=dtype, device=device, metrics=AdapterMetrics(), starvation_s=starvation_s)
    reset_peak_rss()
    rss_before = rss_mib("VmRSS")
    pending = list(trace)
    waiting: list[Request] = []
    running: list[list] = []  # [request, tokens left]
    poll_times: list[float] = []
    activations = torch.randn(max_batch, shapes.shapes["q_proj"][0])
    weight = torch.randn(shapes.shapes["q_proj"][0], 4 * shapes.shapes["q_proj"][0])
    product = torch.empty(max_batch, weight.shape[1])
    tokens = 0
    started = time.perf_counter()
    try:
        while pending or waiting or running:
            # Admission: the scheduler prefetches every queued request's adapter at once.
            while pending and len(waiting) < 4 * max_batch:
                request = pending.pop(0)
                tiers.prefetch(ids[request.adapter])
                waiting.append(request)
            t = time.perf_counter()
            # The queue's demand, as the engine passes it: resident adapters with waiting requests are kept.
            result = tiers.poll(dict(Counter(ids[r.adapter] for r in waiting)))
            poll_times.append(time.perf_counter() - t)
            if result.failed:
                raise RuntimeError(f"loads failed: {result.failed}")
            for request in list(waiting):
                if len(running) >= max_batch:
                    break
                if tiers.slot_of(ids[request.adapter]) is not None:
                    tiers.pin(ids[request.adapter])
                    waiting.remove(request)
                    running.append([request, request.output_tokens])
            compute_until = time.perf_counter() + step_s
            while time.perf_counter() < compute_until:
                # The model step: torch matmuls on the intra-op pool, releasing the GIL as a forward pass does.
                torch.mm(activations, weight, out=product)
            still = []
            for entry in running:
                entry[1] -= 1
                tokens += 1
                if entry[1] == 0:
                    tiers.unpin(ids[entry[0].adapter])
                else:
                    still.append(entry)
            running = still
        wall = time.perf_counter() - started
        snapshot = tiers.metrics.snapshot()
        cold = list(snapshot.load_latencies_s)
        return ReplayResult(tokens / wall, wall, snapshot.hit_rate("device"), snapshot.hit_rate("host"),
                            quantile(cold, 0.5) * 1e3, quantile(cold, 0.99) * 1e3, len(cold),
                            quantile(poll_times, 0.99) * 1e3, snapshot.evictions, rss_mib(), rss_before)
    finally:
        tiers.close()


@dataclass(frozen=True)
class EngineResult:
    tokens_per_s: float
    wall_s: float
    device_hit_rate: float
    cold_p50_ms: float
    cold_p99_ms: float
    cold_loads: int
    errors: int
    peak_rss_mib: float


def run_engine(model_dir: Path, store: AdapterStore, ids: list[str], trace: list[Request], *, device_budget: int,
               host_budget: int, max_running: int, device: str, kv_mib: int) -> EngineResult:
    """The real engine over the trace: all requests submitted at once, steps until every one finished."""
    from longtail.serving.adapter_tiers import TierConfig
    from longtail.serving.engine import Engine
    from longtail.serving.sampling import SamplingParams

    tiers = TierConfig(store_home=str(store.home), device_bytes=device_budget, host_bytes=host_budget)
    engine = Engine.from_pretrained(model_dir, device=device, kv_cache_bytes=kv_mib * MIB,
                                    max_running=max_running, adapters=tiers)
    rng = random.Random(7)
    vocab = engine.model_config.vocab_size
    try:
        # Warm the model (first-call allocations, kernel selection) so neither run pays it in its timing.
        engine.generate([[1, 2, 3, 4]] * 4, [None] * 4, SamplingParams(max_tokens=4, temperature=0.0))
        reset_peak_rss()
        started = time.perf_counter()
        handles = [engine.submit([rng.randrange(vocab) for _ in range(r.prompt_tokens)], ids[r.adapter],
                                 SamplingParams(max_tokens=r.output_tokens, temperature=0.0, ignore_eos=True))
                   for r in trace]
        while not all(h.done.is_set() for h in handles):
            if engine.step() == 0:
                time.sleep(0.001)  # only loads are pending: let the loader thread run
        wall = time.perf_counter() - started
        outputs = [h.output() for h in handles]
        tokens = sum(len(o.token_ids) for o in outputs)
        snapshot = engine.adapters.metrics.snapshot()
        cold = list(snapshot.load_latencies_s)
        return EngineResult(tokens / wall, wall, snapshot.hit_rate("device"), quantile(cold, 0.5) * 1e3,
                            quantile(cold, 0.99) * 1e3, len(cold), sum(o.error is not None for o in outputs),
                            rss_mib())
    finally:
        engine.shutdown()


@dataclass(frozen=True)
class HttpResult:
    tokens_per_s: float
    wall_s: float
    statuses: dict
    cold_p50_ms: float
    cold_p99_ms: float
    cold_loads: int
    evictions: int
    peak_rss_mib: float


def run_http(model_dir: Path, store: AdapterStore, ids: list[str], trace: list[Request], *, device_budget: int,
             host_budget: int, max_running: int, clients: int, device: str, kv_mib: int) -> HttpResult:
    """A real node (engine on a thread with its tiers over the store, SQLite receipts, payments with a local chain
    stand-in) answering /v1/completions over loopback HTTP, `clients` requests at a time."""
    return asyncio.run(_run_http(model_dir, store, ids, trace, device_budget=device_budget,
                                 host_budget=host_budget, max_running=max_running, clients=clients, device=device,
                                 kv_mib=kv_mib))


async def _run_http(model_dir, store, ids, trace, *, device_budget, host_budget, max_running, clients, device,
                    kv_mib) -> HttpResult:
    import inspect
    import tempfile

    import aiohttp
    from aiohttp import web
    from eth_account import Account
    from transformers import AutoTokenizer

    from longtail.attribution.receipts import ReceiptDomain
    from longtail.attribution.store import ReceiptLog
    from longtail.node.adapter_admin import AdapterAdmin
    from longtail.node.api import SERVER_OPTIONS, build_app
    from longtail.node.attributor import Attributor
    from longtail.node.catalog import Catalog, CatalogEntry
    from longtail.node.config import NodeConfig
    from longtail.node.generation import GenerationGateway
    from longtail.node.payments import ChannelState, PaymentIntake
    from longtail.node.service import Node
    from longtail.serving.adapter_tiers import TierConfig
    from longtail.serving.engine_client import LocalEngine

    key = bytes(range(1, 33))
    address = Account.from_key(key).address
    client_address, channel = "0x" + "cc" * 20, "0x" + "01" * 32
    pay = {"X-Longtail-Channel": channel, "X-Longtail-Voucher-Amount": str(10**30),
           "X-Longtail-Voucher-Signature": "0x" + "11" * 65}
    tiers = TierConfig(store_home=str(store.home), device_bytes=device_budget, host_bytes=host_budget)
    engine = await asyncio.to_thread(LocalEngine.from_pretrained, model_dir, device=device,
                                     kv_cache_bytes=kv_mib * MIB, max_running=max_running, adapters=tiers)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    home = Path(tempfile.mkdtemp(prefix="bench-node-"))

    async def read_channel(channel_id):
        return ChannelState(channel_id, client_address, address, 10**30, 0, False)

    async def load_account(channel_id):
        return 0, None

    async def save_voucher(voucher, client):
        pass

    # Payment is not what this measures (bench_node.py does): fake signatures, no per-request authorization.
    relaxed = ({"require_authorization": False}
               if "require_authorization" in inspect.signature(PaymentIntake).parameters else {})
    payments = PaymentIntake(address, read_channel, lambda *_: client_address, load_account, save_voucher,
                             channel_cache_seconds=3600.0, **relaxed)
    config = NodeConfig(name="bench", home=home, adapter_credit=False, price_per_1k_tokens=1,
                        max_waiting_requests=4 * clients, max_tokens_limit=256)
    receipt_log = ReceiptLog.open(f"sqlite:///{home / 'receipts.sqlite'}", key,
                                  ReceiptDomain(chain_id=31337, verifying_contract="0x" + "22" * 20))
    catalog = Catalog(CatalogEntry(name="base", adapter_id=None, price_per_1k_tokens=1))
    for adapter_id in ids:  # stored already: the tiers find them in the store, nothing is loaded yet
        catalog.add(CatalogEntry(name=adapter_id, adapter_id=adapter_id, price_per_1k_tokens=1))
    node = Node(config, address, catalog, GenerationGateway(engine, tokenizer), receipt_log, payments,
                Attributor(), "0x" + "33" * 32)
    admin = AdapterAdmin(engine, catalog, store, engine.model_config.module_shapes(), 1, "LONGTAIL_BENCH_NO_TOKEN")
    runner = web.AppRunner(build_app(node, admin), access_log=None, **SERVER_OPTIONS)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    words = ["river", "stone", "light", "market", "garden", "signal", "paper", "window", "winter", "engine"]
    rng = random.Random(11)
    statuses: Counter = Counter()
    tokens = 0
    try:
        async with aiohttp.ClientSession(url) as session:
            async def ask(request: Request, adapter_id: str | None) -> None:
                nonlocal tokens
                prompt = " ".join(rng.choice(words) for _ in range(request.prompt_tokens))
                body = {"model": adapter_id or "base", "prompt": prompt, "max_tokens": request.output_tokens,
                        "temperature": 0}
                async with session.post("/v1/completions", json=body, headers=pay) as response:
                    statuses[response.status] += 1
                    if response.status == 200:
                        tokens += (await response.json())["usage"]["completion_tokens"]

            await ask(Request(0, 4, 4), None)  # warm the model and the HTTP path
            tokens = 0
            statuses.clear()
            reset_peak_rss()
            queue = list(trace)
            started = time.perf_counter()

            async def worker() -> None:
                while queue:
                    request = queue.pop(0)
                    await ask(request, ids[request.adapter])

            await asyncio.gather(*(worker() for _ in range(clients)))
            wall = time.perf_counter() - started
        stats = await asyncio.to_thread(engine.stats)
        cold = list(stats.cold_wait_seconds)
        return HttpResult(tokens / wall, wall, dict(statuses), quantile(cold, 0.5) * 1e3, quantile(cold, 0.99) * 1e3,
                          stats.cold_wait_count, stats.evictions.get("device", 0), rss_mib())
    finally:
        await runner.cleanup()
        receipt_log.close()
        await asyncio.to_thread(engine.shutdown)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=1000)
    parser.add_argument("--baseline-adapters", type=int, default=10)
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.8, 1.2])
    parser.add_argument("--device-budget-mib", type=int, default=256)
    parser.add_argument("--host-budget-mib", type=int, default=1024)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--step-ms", type=float, default=25.0, help="compute time of one model step in the replay")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", type=Path, default=None, help="base model folder (default: the embedded one)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="where generated adapters are kept between runs (default $LONGTAIL_HOME/bench/adapters)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--engine-requests", type=int, default=96,
                        help="requests per engine run (the real model on CPU is the slow part)")
    parser.add_argument("--engine-max-running", type=int, default=16)
    parser.add_argument("--kv-mib", type=int, default=256)
    parser.add_argument("--no-engine", action="store_true", help="skip the real-engine runs")
    parser.add_argument("--no-http", action="store_true", help="skip the runs through a node's HTTP API")
    parser.add_argument("--http-requests", type=int, default=96)
    parser.add_argument("--http-clients", type=int, default=16, help="requests in flight at once over HTTP")
    parser.add_argument("--quick", action="store_true", help="100 adapters, 150 requests, one alpha: a smoke run")
    parser.add_argument("--no-docs", action="store_true")
    parser.add_argument("--starvation-s", type=float, default=1.0,
                        help="a cold adapter wanted this long may evict resident adapters that have waiting requests "
                             "(0: the old policy, any unpinned adapter may go)")
    args = parser.parse_args()
    if args.quick:
        args.adapters, args.requests, args.alphas, args.engine_requests = 100, 150, [1.2], 32
        args.http_requests = 32
        args.device_budget_mib, args.host_budget_mib = 160, 400

    model_dir = args.model or embedded_model_dir()
    shapes = ModuleShapes.from_model_dir(model_dir)
    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    work_dir = args.work_dir or longtail_home() / "bench" / "adapters"
    work_dir.mkdir(parents=True, exist_ok=True)
    print(f"== preparing {args.adapters} adapters in {work_dir}", flush=True)
    started = time.perf_counter()
    store, ids = prepare_adapters(work_dir, args.adapters, shapes, args.seed)
    element = torch.empty((), dtype=dtype).element_size()
    sizes = [store.get(i).tensor_bytes // 4 * element for i in ids]
    total = sum(sizes)
    print(f"   {len(ids)} adapters, {total / MIB:.0f} MiB in {dtype} (largest {max(sizes) / MIB:.1f} MiB), "
          f"ready in {time.perf_counter() - started:.0f} s", flush=True)
    device_budget, host_budget = args.device_budget_mib * MIB, args.host_budget_mib * MIB

    rows = []
    for alpha in args.alphas:
        results = {}
        for label, population in (("baseline", args.baseline_adapters), ("many", args.adapters)):
            trace = zipf_trace(population, args.requests, alpha, args.seed + 1)
            # The baseline's 10 adapters are 10 of the same population, so sizes are comparable.
            results[label] = replay(store, ids[:population], trace, shapes, device_budget=device_budget,
                                    host_budget=host_budget, max_batch=args.max_batch, step_s=args.step_ms / 1e3,
                                    dtype=dtype, device=args.device, starvation_s=args.starvation_s)
            r = results[label]
            print(f"   alpha {alpha} {population:>5} adapters: {r.tokens_per_s:7.1f} tok/s, device hit "
                  f"{r.device_hit_rate:.2f}, host hit {r.host_hit_rate:.2f}, cold p50 {r.cold_p50_ms:.1f} ms "
                  f"p99 {r.cold_p99_ms:.1f} ms ({r.cold_loads} cold), poll p99 {r.poll_p99_ms:.2f} ms, "
                  f"peak RSS {r.peak_rss_mib:.0f} MiB", flush=True)
        base, many = results["baseline"], results["many"]
        ratio = many.tokens_per_s / base.tokens_per_s
        rows.append(f"| {alpha} | {args.adapters} | {many.tokens_per_s:.0f} | {base.tokens_per_s:.0f} | "
                    f"**{ratio:.2f}×** | {many.cold_p50_ms:.1f} / {many.cold_p99_ms:.1f} | "
                    f"{many.device_hit_rate:.2f} / {many.host_hit_rate:.2f} | "
                    f"{many.evictions.get('device', 0)} / {many.evictions.get('host', 0)} | "
                    f"{many.poll_p99_ms:.2f} | {many.peak_rss_mib:.0f} (start {many.rss_before_mib:.0f}) |")

    engine_rows = []
    if not args.no_engine:
        for alpha in args.alphas:
            results = {}
            for label, population in (("baseline", args.baseline_adapters), ("many", args.adapters)):
                trace = [Request(r.adapter, r.prompt_tokens, min(r.output_tokens, 32))
                         for r in zipf_trace(population, args.engine_requests, alpha, args.seed + 2)]
                results[label] = r = run_engine(model_dir, store, ids[:population], trace,
                                                device_budget=device_budget, host_budget=host_budget,
                                                max_running=args.engine_max_running, device=args.device,
                                                kv_mib=args.kv_mib)
                print(f"   engine alpha {alpha} {population:>5} adapters: {r.tokens_per_s:6.1f} tok/s, device hit "
                      f"{r.device_hit_rate:.2f}, cold p50 {r.cold_p50_ms:.0f} ms p99 {r.cold_p99_ms:.0f} ms "
                      f"({r.cold_loads} cold), errors {r.errors}, peak RSS {r.peak_rss_mib:.0f} MiB", flush=True)
            base, many = results["baseline"], results["many"]
            engine_rows.append(
                f"| {alpha} | {args.adapters} | {many.tokens_per_s:.1f} | {base.tokens_per_s:.1f} | "
                f"**{many.tokens_per_s / base.tokens_per_s:.2f}×** | {many.cold_p50_ms:.0f} / {many.cold_p99_ms:.0f} | "
                f"{many.device_hit_rate:.2f} | {many.errors} | {many.peak_rss_mib:.0f} |")

    http_rows = []
    if not args.no_http:
        for alpha in args.alphas:
            results = {}
            for label, population in (("baseline", args.baseline_adapters), ("many", args.adapters)):
                trace = [Request(r.adapter, r.prompt_tokens, min(r.output_tokens, 32))
                         for r in zipf_trace(population, args.http_requests, alpha, args.seed + 3)]
                results[label] = r = run_http(model_dir, store, ids[:population], trace,
                                              device_budget=device_budget, host_budget=host_budget,
                                              max_running=args.engine_max_running, clients=args.http_clients,
                                              device=args.device, kv_mib=args.kv_mib)
                print(f"   http alpha {alpha} {population:>5} adapters: {r.tokens_per_s:6.1f} tok/s, statuses "
                      f"{r.statuses}, cold p50 {r.cold_p50_ms:.0f} ms p99 {r.cold_p99_ms:.0f} ms "
                      f"({r.cold_loads} cold), {r.evictions} evictions, peak RSS {r.peak_rss_mib:.0f} MiB", flush=True)
            base, many = results["baseline"], results["many"]
            failed = sum(n for status, n in many.statuses.items() if status != 200)
            http_rows.append(
                f"| {alpha} | {args.adapters} | {many.tokens_per_s:.1f} | {base.tokens_per_s:.1f} | "
                f"**{many.tokens_per_s / base.tokens_per_s:.2f}×** | {many.cold_p50_ms:.0f} / {many.cold_p99_ms:.0f} "
                f"| {many.evictions} | {failed} | {many.peak_rss_mib:.0f} |")

    budget_line = (f"Budgets: device {args.device_budget_mib} MiB, host {args.host_budget_mib} MiB, against "
                   f"{total / MIB:.0f} MiB of adapters in {str(dtype).removeprefix('torch.')} "
                   f"({len(ids)} adapters, ranks 4–64, four target sets; largest {max(sizes) / MIB:.1f} MiB).")
    table = "\n".join([
        f"`python scripts/bench_adapters.py{' --quick' if args.quick else ''}` — tier replay: continuous "
        f"batching (max batch {args.max_batch}), {args.requests} requests with 16–64 output tokens, Zipf "
        f"popularity, model step = {args.step_ms:g} ms of busy compute, device slots = one preallocated buffer "
        f"of the device budget. Baseline: the same requests over {args.baseline_adapters} adapters, same run.",
        "",
        budget_line,
        "",
        "| Zipf α | adapters | tok/s | tok/s with 10 | ratio (target ≥ 0.7) | cold load p50 / p99 ms "
        "(disk → device slot) | hit rate device / host | evictions device / host | poll p99 ms | peak RSS MiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
        *([
            "",
            f"Real engine (`serving.Engine`, {model_dir.name}, {args.device}, greedy, max running "
            f"{args.engine_max_running}, KV pool {args.kv_mib} MiB): {args.engine_requests} requests submitted at "
            "once, 16–64 prompt and 16–32 output tokens, same budgets; baseline the same requests over "
            f"{args.baseline_adapters} adapters.",
            "",
            "| Zipf α | adapters | tok/s | tok/s with 10 | ratio (target ≥ 0.7) | cold load p50 / p99 ms | "
            "device hit rate | failed requests | peak RSS MiB (base + KV + budgets + runtime) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            *engine_rows,
        ] if engine_rows else []),
        *([
            "",
            f"Through a node's HTTP API (`POST /v1/completions` on loopback, engine on a thread with the tiers over "
            f"the same store, {model_dir.name}, {args.device}, greedy, {args.http_clients} requests in flight, "
            f"{args.http_requests} requests of 16–64 prompt words and 16–32 output tokens; the node stops at EOS, "
            "so tok/s counts the completion tokens it reported): baseline the same requests over "
            f"{args.baseline_adapters} adapters, same run.",
            "",
            "| Zipf α | adapters | tok/s | tok/s with 10 | ratio (target ≥ 0.7) | cold load p50 / p99 ms | "
            "device evictions | non-200 answers | peak RSS MiB (whole node process) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            *http_rows,
        ] if http_rows else []),
        "",
        "Peak RSS includes the Python/torch runtime and the budgets' buffers; the base model and KV pool are "
        "not loaded in the replay. Cold load = from a request's admission until its adapter's slot is usable "
        "(background disk read, validation, hash check on first read, copy into the slot).",
        *(["", NOTE_HTTP.format(load=f"{os.getloadavg()[0]:.1f}")] if http_rows else []),
    ])
    print(table)
    if not args.no_docs:
        write_section(REPO / "docs" / "benchmarks.md", "adapters", "## Adapters\n\n" + table)


if __name__ == "__main__":
    main()
