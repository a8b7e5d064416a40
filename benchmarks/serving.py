"""Serving capacity: the same SGLang server, pool and workload with `--kv-evict none` and each policy, alternated.

Workload: N concurrent long generations (streamed, greedy, fixed length) against a pool that holds about four
full-length requests. Per policy: output tokens/s, completed requests, peak running requests (polled from
`/v1/loads`), retractions (the scheduler's log), TTFT and per-token latency. Then the policy overhead per decode
step against context length: one batch of requests whose prompts fill the context, decoded with `none` and with
the policy in three settings: a budget above the full length (nothing to evict, so nothing is scored: the
bookkeeping alone), a budget equal to the context (the prompt unprotected: every step scores the whole context
and every 16 steps evict down to it) and `--budget` (each request runs at that budget from its first step on
while its positions continue from the context); per-token latency compared, and eviction's share of the policy's
decode steps measured inside them once every request has settled.
Last, `--kv-evict none` against stock SGLang (this package's plugin not loaded: SGLang's `SGLANG_PLUGINS`
whitelist leaves it out), fresh servers alternated, per-token latency at 2K context.

    python -m benchmarks.serving [--quick] [--policies crystal,rkv] [--contexts 1024,2048] [--gpu]
                                 [--only capacity|overhead|stock]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import threading
import time
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

from crystal_sglang.models import prepare_default_model
from crystal_sglang.prompts import chat_messages, load_problems
from crystal_sglang.server import CPU_SERVER_ARGS, SGLangServer

RETRACTED = re.compile(r"#retracted_reqs: (\d+)")
STOCK_ENV = {"SGLANG_PLUGINS": "stock"}  # a plugin whitelist that leaves crystal-sglang's plugin out
STOCK_CONTEXT = 2048
POLICY_TIME = ("crystal_kv:policy_seconds_total", "crystal_kv:decode_seconds_total")  # eviction work, decode steps
SETTLED = 4  # streamed tokens after which a request's decode steps are timed (its first step's one-off work is past)
OVERHEAD_TOKENS = 48  # new tokens per request in the overhead sweep: two evictions at budget + 16 after the first


def stream_one(base_url: str, payload: dict, on_token=None) -> dict:
    """One streamed /generate request: time to first token, gaps between tokens, tokens produced, and the largest
    memory its eviction held beside the pool (`state_bytes` of its chunks' meta info; 0 when it did not evict).
    `on_token(count)` is called as the count of streamed tokens grows."""
    request = urllib.request.Request(base_url + "/generate", data=json.dumps({**payload, "stream": True}).encode(),
                                     headers={"Content-Type": "application/json"})
    begin = time.monotonic()
    stamps, tokens, state_bytes = [], 0, 0
    with urllib.request.urlopen(request, timeout=3600) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            eviction = chunk["meta_info"].get("kv_evict") or [{}]
            state_bytes = max(state_bytes, eviction[-1].get("state_bytes", 0))
            count = chunk["meta_info"]["completion_tokens"]
            if count > tokens:
                stamps.append(time.monotonic())
                tokens = count
                if on_token is not None:
                    on_token(count)
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"ttft": stamps[0] - begin if stamps else None, "gaps": gaps, "tokens": tokens, "state_bytes": state_bytes}


def run_workload(server: SGLangServer, prompts: list[str], new_tokens: int) -> dict:
    results: list = [None] * len(prompts)
    loads, done = [], threading.Event()

    def poll():
        while not done.is_set():
            loads.append(server.get("/v1/loads")["loads"][0])
            time.sleep(0.25)

    def run(index):
        results[index] = stream_one(server.base_url, {
            "text": prompts[index], "sampling_params": {"temperature": 0, "max_new_tokens": new_tokens,
                                                        "ignore_eos": True},
        })  # fmt: skip

    poller = threading.Thread(target=poll)
    poller.start()
    begin = time.monotonic()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.monotonic() - begin
    done.set()
    poller.join()
    gaps = sorted(gap for result in results for gap in result["gaps"])
    ttfts = sorted(result["ttft"] for result in results if result["ttft"] is not None)
    tokens = sum(result["tokens"] for result in results)
    return {
        "seconds": seconds, "output_tokens": tokens, "output_tok_per_s": tokens / seconds,
        "completed": sum(result["tokens"] == new_tokens for result in results),
        "peak_running": max(load["num_running_reqs"] for load in loads),
        "peak_used_tokens": max(load["num_used_tokens"] for load in loads),
        "state_bytes_per_request": max(result["state_bytes"] for result in results),
        "ttft_p50": statistics.median(ttfts), "ttft_p99": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))],
        "itl_p50": statistics.median(gaps), "itl_p99": gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))],
    }  # fmt: skip


def step_latency(server: SGLangServer, prompt_ids: list[int], batch: int, new_tokens: int, custom: dict | None,
                 measure_policy: bool = False) -> tuple[float, float | None]:
    """Median per-token decode latency of `batch` concurrent requests with `prompt_ids` as context, and with
    `measure_policy` eviction's share of the decode steps run after every request streamed `SETTLED` tokens (the
    server's `crystal_kv:policy_seconds` over `crystal_kv:decode_seconds`; a first step's one-off work left out)."""
    results: list = [None] * batch
    streamed, lock, settled = [0] * batch, threading.Lock(), []

    def seen(index, count):
        with lock:
            streamed[index] = count
            if measure_policy and not settled and min(streamed) >= SETTLED:
                settled.append(server.metrics())

    def run(index):
        params = {"temperature": 0, "max_new_tokens": new_tokens, "ignore_eos": True}
        if custom:
            params["custom_params"] = custom
        payload = {"input_ids": prompt_ids[index:], "sampling_params": params}
        results[index] = stream_one(server.base_url, payload, lambda count: seen(index, count))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(batch)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    latency = statistics.median(gap for result in results for gap in result["gaps"][SETTLED:])
    if not measure_policy:
        return latency, None
    spent = {key: server.metrics()[key] - settled[0][key] for key in POLICY_TIME}
    return latency, spent[POLICY_TIME[0]] / spent[POLICY_TIME[1]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer and shorter requests (minutes on 2 cores)")
    parser.add_argument("--policies", default="crystal", help="comma-separated policies compared with none")
    parser.add_argument("--budget", default="128")
    parser.add_argument("--gpu", action="store_true", help="FlashInfer and compiled Triton instead of CPU args")
    parser.add_argument("--only", choices=("capacity", "overhead", "stock"), help="run one part of the benchmark")
    parser.add_argument("--contexts", help="comma-separated context lengths of the overhead sweep "
                                           "(default 1024,2048 quick, 1024-8192 full)")
    parser.add_argument("--config", type=json.loads, default={},
                        help='eviction config of every evicting server and request, e.g. \'{"redundancy": 0}\'')
    parser.add_argument("--out", default="results/serving")
    args = parser.parse_args(argv)

    requests, new_tokens = (8, 192) if args.quick else (16, 512)
    contexts = [1024, 2048] if args.quick else [1024, 2048, 4096, 8192]
    if args.contexts:
        contexts = [int(context) for context in args.contexts.split(",")]
    overhead_batch = 4 if args.quick else 8
    rounds = 2 if args.quick else 3  # alternated measurements of the overhead and of none against stock
    model = prepare_default_model()
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    # A context plus the sweep's new tokens must fit the model's positions (SGLang refuses a longer context length).
    longest = AutoConfig.from_pretrained(model).max_position_embeddings - OVERHEAD_TOKENS
    if max(contexts) > longest:
        print(f"overhead sweep: contexts above {longest} run at {longest} (the model has "
              f"{longest + OVERHEAD_TOKENS} positions, {OVERHEAD_TOKENS} of them for new tokens)", flush=True)
        contexts = sorted({min(context, longest) for context in contexts})
    problems = load_problems(limit=requests) * (1 + requests // len(load_problems()))
    prompts = [tokenizer.apply_chat_template(chat_messages(p), add_generation_prompt=True, tokenize=False)
               for p in problems[:requests]]
    longest_prompt = max(len(tokenizer(p)["input_ids"]) for p in prompts)
    pool = 4 * (longest_prompt + new_tokens)  # about four full-length requests
    device = [] if args.gpu else list(CPU_SERVER_ARGS)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    policies = ["none", *[p for p in args.policies.split(",") if p and p != "none"]]
    report = {"requests": requests, "new_tokens": new_tokens, "pool_tokens": pool, "budget": args.budget,
              "config": args.config, "capacity": {}, "overhead": {}, "stock": {}}
    name = "serving" + ("-quick" if args.quick else "") + (f"-{args.only}" if args.only else "")
    report_path = out / f"{name}.json"

    def save() -> None:  # after every measurement, so that a stopped run keeps what it measured
        report_path.write_text(json.dumps(report, indent=1))

    filler = tokenizer(" ".join(load_problems()) * 200)["input_ids"]
    if args.only in (None, "capacity"):
        measure_capacity(report, save, model, device, policies, prompts, out)
    if args.only in (None, "overhead"):
        policy = policies[1] if len(policies) > 1 else "crystal"
        measure_overhead(report, save, model, device, policy, filler, contexts, overhead_batch, rounds, out)
    if args.only in (None, "stock"):
        measure_stock(report, save, model, device, filler, overhead_batch, rounds, out)

    plot(report, report_path.with_suffix(".png"))
    print(f"wrote {report_path} and its .png")
    return 0


def config_args(report: dict, policy: str) -> list[str]:
    """The report's eviction config (`--config`) as a server flag, for a server that evicts."""
    return ["--kv-evict-config", json.dumps(report["config"])] if report["config"] and policy != "none" else []


def measure_capacity(report: dict, save, model, device: list[str], policies: list[str], prompts: list[str],
                     out: Path) -> None:
    """One server per policy, same pool and workload: report["capacity"][policy]."""
    for policy in tqdm(policies, desc="capacity (one server per policy)", unit="server"):
        log = out / f"server-{policy}.log"
        server_args = [*device, "--max-total-tokens", str(report["pool_tokens"]), "--kv-evict", policy,
                       "--kv-evict-budget", report["budget"], "--disable-radix-cache", *config_args(report, policy)]
        with SGLangServer(model, server_args, log_path=log) as server:
            result = run_workload(server, prompts, report["new_tokens"])
            result["leaked_slots"] = server.pool_used()  # the workload drained: the pool must be empty again
        result["retractions"] = sum(int(n) for n in RETRACTED.findall(log.read_text()))
        report["capacity"][policy] = result
        save()
        print(f"{policy:>14}: {result['output_tok_per_s']:.1f} tok/s, peak running {result['peak_running']}, "
              f"retractions {result['retractions']}, TTFT p50 {result['ttft_p50']:.2f} s, "
              f"ITL p50 {result['itl_p50'] * 1000:.0f} ms, leaked slots {result['leaked_slots']}, eviction state "
              f"{result['state_bytes_per_request'] / 1e3:.0f} KB per request", flush=True)


def measure_overhead(report: dict, save, model, device: list[str], policy: str, filler: list[int],
                     contexts: list[int], batch: int, rounds: int, out: Path) -> None:
    """Per-token latency with `none` and with `policy` within budget (budget above the full length), held at the
    context (budget = context) and evicting at the report's budget (prompt unprotected in both), the four
    alternated over `rounds` batches on one server. Per policy variant: the median ratio of its step time to
    `none`'s over the rounds ("share"; a machine whose speed drifts between runs blurs it), and eviction's share
    measured inside its own settled decode steps ("in_step_share", which that drift does not blur):
    report["overhead"]."""
    longest = max(contexts)
    server_args = [*device, "--max-total-tokens", str(batch * (longest + OVERHEAD_TOKENS + 32) + 64), "--kv-evict",
                   policy, "--kv-evict-budget", str(longest * 2), "--disable-radix-cache", "--context-length",
                   str(longest + OVERHEAD_TOKENS), "--enable-metrics", *config_args(report, policy)]  # fmt: skip
    unprotected = {"kv_evict_config": {"protect_prompt": False, **report["config"]}}
    with SGLangServer(model, server_args, log_path=out / "server-overhead.log") as server:
        for context in tqdm(contexts, desc="overhead vs context", unit="context"):
            variants = {"within budget": None, "held": {"kv_budget": context, **unprotected},
                        "evicting": {"kv_budget": report["budget"], **unprotected}}  # fmt: skip
            ids = filler[:context]  # request i (0 .. batch - 1) gets its last context - i tokens
            base, timed = [], {name: ([], []) for name in variants}
            for _ in range(rounds):
                base.append(step_latency(server, ids, batch, OVERHEAD_TOKENS, {"kv_evict": "none"})[0])
                for name, custom in variants.items():
                    latency, in_step = step_latency(server, ids, batch, OVERHEAD_TOKENS, custom, measure_policy=True)
                    timed[name][0].append(latency)
                    timed[name][1].append(in_step)
            entry = report["overhead"][str(context)] = {"none_s": base}
            line = f"context {context}: none {statistics.median(base) * 1000:.0f} ms/step"
            for name, (latencies, in_steps) in timed.items():
                share = statistics.median(b / a for a, b in zip(base, latencies)) - 1
                entry[name] = {"policy_s": latencies, "share": share, "in_step_share": statistics.median(in_steps),
                               "in_step_shares": in_steps}  # fmt: skip
                line += (f"; {policy} {name} {statistics.median(latencies) * 1000:.0f} ms/step ({100 * share:+.1f} % "
                         f"vs none, per round {[f'{100 * (b / a - 1):+.1f}' for a, b in zip(base, latencies)]}), "
                         f"eviction {100 * statistics.median(in_steps):.1f} % inside its steps")
            save()
            print(line, flush=True)


def measure_stock(report: dict, save, model, device: list[str], filler: list[int], batch: int, rounds: int,
                  out: Path) -> None:
    """Per-token latency at 2K context of `--kv-evict none` and of stock SGLang, a fresh server each, alternated
    over `rounds`: report["stock"]. The CPU support shim runs in both (stock SGLang does not start here without it)."""
    ids = filler[: STOCK_CONTEXT - 32 + batch]
    server_args = [*device, "--max-total-tokens", str(batch * (STOCK_CONTEXT + 64) + 64), "--disable-radix-cache",
                   "--context-length", str(STOCK_CONTEXT)]  # fmt: skip
    variants = {"stock": ([], STOCK_ENV), "none": (["--kv-evict", "none"], None)}
    samples: dict[str, list[float]] = {kind: [] for kind in variants}
    for _ in tqdm(range(rounds), desc="--kv-evict none vs stock SGLang", unit="round"):
        for kind, (flags, env) in variants.items():
            log = out / f"server-{kind}.log"
            with SGLangServer(model, [*server_args, *flags], log_path=log, env=env) as server:
                if server.runs_crystal_plugin() != (kind == "none"):
                    raise RuntimeError(f"the {kind} server has the plugin {'missing' if kind == 'none' else 'loaded'}")
                step_latency(server, ids, batch, SETTLED + 4, None)  # warm-up
                samples[kind].append(step_latency(server, ids, batch, 24, None)[0])
    stock, none = statistics.median(samples["stock"]), statistics.median(samples["none"])
    report["stock"] = {"context": STOCK_CONTEXT, "batch": batch, "stock_s": samples["stock"],
                       "none_s": samples["none"], "share": none / stock - 1}  # fmt: skip
    save()
    print(f"--kv-evict none {none * 1000:.1f} ms/step vs stock SGLang {stock * 1000:.1f} ms/step "
          f"({100 * (none / stock - 1):+.1f} %; per round: {[round(v * 1000, 1) for v in samples['none']]} vs "
          f"{[round(v * 1000, 1) for v in samples['stock']]} ms)", flush=True)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    capacity, overhead, stock = report["capacity"], report["overhead"], report["stock"]
    names = list(capacity)
    metrics = [("output_tok_per_s", "output tok/s"), ("peak_running", "peak running requests"),
               ("retractions", "retractions"), ("ttft_p50", "TTFT p50 (s)"), ("itl_p50", "per-token p50 (s)")]
    metrics = metrics if capacity else []  # a partial run (--only) plots only its own part
    panels = len(metrics) + bool(overhead) + bool(stock)
    figure, axes = plt.subplots(1, panels, figsize=(4 * panels, 3.5), squeeze=False)
    for axis, (key, label) in zip(axes[0], metrics):
        axis.bar(names, [capacity[name][key] for name in names], color=["grey", *["tab:blue"] * (len(names) - 1)])
        if len(names) > 3:  # many policies: slanted names, each ending under its bar
            plt.setp(axis.get_xticklabels(), rotation=45, ha="right", rotation_mode="anchor", fontsize=8)
        axis.set_title(label)
    if overhead:
        axis = axes[0][len(metrics)]
        contexts = [int(c) for c in overhead]
        variants = (("within budget", "within budget", "tab:grey"), ("held", "held at the context", "tab:orange"),
                    ("evicting", f"evicting at {report['budget']}", "tab:blue"))  # fmt: skip
        for name, label, color in variants:
            entries = [overhead[str(c)][name] for c in contexts]
            axis.plot(contexts, [100 * e["share"] for e in entries], "o-", color=color,
                      label=f"{label}: step time vs none")
            axis.plot(contexts, [100 * e["in_step_share"] for e in entries], "s--", color=color,
                      label=f"{label}: share inside its steps")
        axis.axhline(0, color="grey", linewidth=0.5)
        axis.axhline(10, color="red", linestyle=":", linewidth=0.8, label="target: 10 % of a step")
        axis.set_xlabel("context (tokens)")
        axis.set_title("policy overhead per step (%)")
        axis.legend(fontsize=7)
    if stock:
        axis = axes[0][-1]
        kinds = ["stock", "none"]
        medians = [1000 * statistics.median(stock[f"{kind}_s"]) for kind in kinds]
        axis.bar(["stock SGLang", "--kv-evict none"], medians, color=["grey", "tab:blue"], alpha=0.6)
        for index, kind in enumerate(kinds):
            values = [1000 * v for v in stock[f"{kind}_s"]]
            axis.scatter([index] * len(values), values, color="black", s=12, zorder=3)
        axis.set_ylabel("ms per token (median; dots: one server each)")
        axis.set_title(f"plugin loaded, eviction off: {100 * stock['share']:+.1f} %")
    if capacity:
        figure.suptitle(f"{report['requests']} requests x {report['new_tokens']} tokens, pool "
                        f"{report['pool_tokens']} tokens, budget {report['budget']}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
