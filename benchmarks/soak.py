"""Bounded soak: concurrent clients on loopback against one evicting server, a fixed count of mixed requests.

Each client draws its requests from a seeded mix: complete generations under every policy and several budgets
(fixed, share, above the length), streams the client drops after a few chunks, parallel sampling (`n` = 2), and
bad eviction parameters that must be refused with HTTP 400. A sampler records the pool's used slots and the
server's resident memory over time. When the work has drained the prefix cache is flushed and the pool must be
empty again: leaked slots are reported (and must be 0), as are errors (anything but the expected answers) and
eviction failures the server logged.

    python -m benchmarks.soak [--quick] [--clients 8] [--requests 400] [--model default|tiny] [--out results/soak]
"""

from __future__ import annotations

import argparse
import json
import random
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
from tqdm.auto import tqdm

from crystal_sglang.policies import POLICY_NAMES
from crystal_sglang.server import CPU_SERVER_ARGS, SGLangServer, ServerError

BUDGETS = (24, 32, 48, "20%", 4096)
BAD_PARAMS = (
    {"kv_budget": 0},
    {"kv_budget": -5},
    {"kv_budget": "lots"},
    {"kv_budget": 4},  # below the protected window
    {"kv_evict": "lru-ish"},
    {"kv_evict": 7},
    {"kv_evict_config": {"top_p": "high"}},
    {"kv_evict_config": {"window": 10**12}},
    {"kv_evict_config": "{not json"},
    {"kv_unknown": 1},
)
KINDS = ("complete", "complete", "complete", "disconnect", "parallel", "bad")
EVICTION_FAILED = "crystal-sglang: eviction failed"


@dataclass
class SoakReport:
    requests: int = 0
    served: int = 0  # complete and parallel requests answered with every token
    refused_as_expected: int = 0  # bad parameters answered 400
    disconnected: int = 0  # streams the client dropped on purpose
    errors: list[str] = field(default_factory=list)
    leaked_slots: int | None = None
    eviction_failures: int = 0
    seconds: float = 0.0
    samples: list[dict] = field(default_factory=list)  # {"t", "used_tokens", "rss_mib"}

    @property
    def ok(self) -> bool:
        return not self.errors and self.leaked_slots == 0 and self.eviction_failures == 0


def prompt_ids(rng: random.Random, vocab: int) -> list[int]:
    return [1] + [rng.randrange(3, vocab) for _ in range(rng.randrange(4, 40))]


def one_request(server: SGLangServer, rng: random.Random, max_new_tokens: int, vocab: int, report: SoakReport,
                lock: threading.Lock) -> None:  # fmt: skip
    kind = rng.choice(KINDS)
    new_tokens = rng.randrange(8, max_new_tokens + 1)
    params = {"temperature": 0, "max_new_tokens": new_tokens, "ignore_eos": True,
              "custom_params": {"kv_evict": rng.choice(POLICY_NAMES), "kv_budget": rng.choice(BUDGETS)}}  # fmt: skip
    payload = {"input_ids": prompt_ids(rng, vocab), "sampling_params": params}
    outcome, error = None, None
    try:
        if kind == "bad":
            params["custom_params"] = rng.choice(BAD_PARAMS)
            try:
                server.post("/generate", payload)
                error = f"bad parameters {params['custom_params']} were accepted"
            except ServerError as refused:
                outcome = "refused_as_expected" if refused.status == 400 else None
                error = None if outcome else f"bad parameters answered {refused.status}: {refused}"
        elif kind == "disconnect":
            drop_stream(server, payload, chunks=rng.randrange(1, 4))
            outcome = "disconnected"
        else:
            if kind == "parallel":
                params.update(n=2, temperature=0.8, sampling_seed=rng.randrange(1 << 30))
            reply = server.post("/generate", payload)
            replies = reply if isinstance(reply, list) else [reply]
            counts = [r["meta_info"]["completion_tokens"] for r in replies]
            short = [count for count in counts if count != new_tokens]
            outcome = "served" if not short else None
            error = None if outcome else f"{kind}: {short} tokens instead of {new_tokens}"
    except Exception as failure:  # noqa: BLE001 - a soak reports every failure instead of stopping
        error = f"{kind}: {type(failure).__name__}: {failure}"
    with lock:
        report.requests += 1
        if outcome:
            setattr(report, outcome, getattr(report, outcome) + 1)
        if error:
            report.errors.append(error)


def drop_stream(server: SGLangServer, payload: dict, chunks: int) -> None:
    """Start a streamed generation, read a few chunks, then close the connection mid-stream."""
    request = urllib.request.Request(server.base_url + "/generate", data=json.dumps({**payload, "stream": True}).encode(),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=600) as response:
        seen = 0
        for raw in response:
            if raw.startswith(b"data:"):
                seen += 1
                if seen >= chunks:
                    break


def sample_memory(server: SGLangServer, report: SoakReport, started: float, done: threading.Event) -> None:
    processes = [psutil.Process(server.process.pid)]
    while not done.is_set():
        try:
            processes = [processes[0], *processes[0].children(recursive=True)]
            rss = sum(p.memory_info().rss for p in processes if p.is_running()) / 2**20
            report.samples.append({"t": time.monotonic() - started, "used_tokens": server.used_tokens(), "rss_mib": rss})
        except (psutil.Error, OSError, KeyError):
            pass
        time.sleep(0.5)


def run_soak(server: SGLangServer, clients: int, requests: int, max_new_tokens: int, vocab: int, seed: int = 0,
             progress: bool = True) -> SoakReport:  # fmt: skip
    """`requests` requests from `clients` concurrent clients; then drain, flush the prefix cache, count leaks."""
    report, lock = SoakReport(), threading.Lock()
    started = time.monotonic()
    done = threading.Event()
    sampler = threading.Thread(target=sample_memory, args=(server, report, started, done), daemon=True)
    sampler.start()
    bar = tqdm(total=requests, desc="soak", unit="req", disable=not progress)

    def client(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        for _ in range(index, requests, clients):
            one_request(server, rng, max_new_tokens, vocab, report, lock)
            bar.update()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    bar.close()
    done.set()
    sampler.join()
    report.seconds = time.monotonic() - started
    server.flush_prefix_cache()
    report.leaked_slots = server.pool_used_when_drained()
    if server.log_path is not None:
        report.eviction_failures = server.log_path.read_text(errors="replace").count(EVICTION_FAILED)
    return report


def plot(report: SoakReport, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t"] for s in report.samples]
    figure, slots_axis = plt.subplots(figsize=(8, 4))
    slots_axis.plot(t, [s["used_tokens"] for s in report.samples], color="tab:blue", label="KV slots in use")
    slots_axis.set_xlabel("seconds")
    slots_axis.set_ylabel("KV slots in use", color="tab:blue")
    rss_axis = slots_axis.twinx()
    rss_axis.plot(t, [s["rss_mib"] for s in report.samples], color="tab:red", label="server RSS")
    rss_axis.set_ylabel("server resident memory (MiB)", color="tab:red")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 clients, 60 requests")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--pool", type=int, default=2048, help="--max-total-tokens of the server")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("results/soak"))
    args = parser.parse_args()
    if args.quick:
        args.clients, args.requests = 4, 60
    from crystal_sglang.models import prepare_default_model

    model = prepare_default_model()
    args.out.mkdir(parents=True, exist_ok=True)
    server_args = [*CPU_SERVER_ARGS, "--max-total-tokens", str(args.pool), "--kv-evict", "crystal",
                   "--kv-evict-budget", "48", "--load-snapshot-publish-interval", "1"]  # fmt: skip
    with SGLangServer(model, server_args, log_path=args.out / "soak-server.log") as server:
        print(f"server up in {server.started_in:.0f} s; {args.clients} clients x {args.requests} requests")
        vocab = json.loads((model / "config.json").read_text())["vocab_size"]
        report = run_soak(server, args.clients, args.requests, args.max_new_tokens, vocab, args.seed)
    summary = {k: v for k, v in asdict(report).items() if k != "samples"}
    summary.update(ok=report.ok, peak_used_tokens=max((s["used_tokens"] for s in report.samples), default=0),
                   rss_mib_first=report.samples[0]["rss_mib"] if report.samples else None,
                   rss_mib_last=report.samples[-1]["rss_mib"] if report.samples else None)  # fmt: skip
    (args.out / "soak.json").write_text(json.dumps({**summary, "samples": report.samples}, indent=1))
    plot(report, f"soak: {args.clients} clients, {args.requests} requests, pool {args.pool}", args.out / "soak.png")
    print(json.dumps(summary, indent=1))
    raise SystemExit(0 if report.ok else 1)


if __name__ == "__main__":
    main()
