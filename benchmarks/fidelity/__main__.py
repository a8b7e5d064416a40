"""Fidelity at a budget: how close each policy's next-token predictions stay to the full cache's.

Protocol (docs: EVALUATION.md section 1). For each prompt (chat template + the step-by-step instruction) the full
cache generates its greedy trace; the trace ends before the end-of-sequence token (nothing is forced past the
natural end; natural lengths are reported). Every policy at every budget (fixed entries, and shares of prompt +
trace) then replays the trace token by token, teacher-forced, all (policy, budget, prompt) rows in one
`EvictingCache`; kvpress's decoding press replays the same traces from its own environment. Per configuration:
top-1 agreement with the full cache, mean KL(full || policy), perplexity of the replayed text and attention recall
(the full cache's attention mass on the entries held), split into the reasoning and the answer part, and the
greedy-match length; beside them two ceilings at the same budgets, eviction that knows the future and oracle
top-k attention. Our policies also decode the traces' prompts free-running (length, 4-gram repetition). With
`--problems` (MATH-500 JSONL), real solutions chained into long conversations are replayed too (scored on the
solutions only).

    python -m benchmarks.fidelity [--quick] [--problems FILE [--solutions-only]] [--out results/fidelity]
    python -m benchmarks.fidelity --merge RUN [RUN ...] --out DIR     # one report from runs on the same sequences
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from benchmarks.fidelity import report
from benchmarks.fidelity.kvpress_runner import COMPRESSION_INTERVAL, PRESSES, SNAPKV_WINDOW, run_kvpress
from benchmarks.fidelity.merge import REALLOCATION_SETTINGS, MergeError, load_run, merge_runs
from benchmarks.fidelity.hindsight import hindsight_scores
from benchmarks.fidelity.oracle import oracle_scores
from benchmarks.fidelity.replay import EVICTABLE_PROMPT, FULL, Config, budget_entries, replay_policies
from benchmarks.fidelity.scoring import ANSWER, ANSWER_RULE, REASONING, summarize
from benchmarks.fidelity.free_running import free_run
from benchmarks.fidelity.workload import (
    Reference,
    eos_ids,
    full_cache_reference,
    greedy_traces,
    load_default_model,
    solution_records,
    solution_sequences,
)
from crystal_sglang.config import Settings, parse_budget
from crystal_sglang.policies import POLICY_NAMES, make_spec
from crystal_sglang.prompts import INSTRUCTION, load_problems

MODES = {
    "quick": dict(prompts=4, new_tokens=256, solution_tokens=512, budgets=("64", "128", "10%", "20%")),
    "full": dict(prompts=20, new_tokens=512, solution_tokens=512, budgets=("64", "128", "256", "10%", "20%", "30%")),
}
COMPARED = "crystal"  # the policy whose gaps to every peer get a paired test
PROTOCOLS = {  # name: (file prefix, what is replayed)
    "greedy_traces": ("", "the model's own full-cache greedy traces"),
    "math500_solutions": ("solutions-", "real solutions chained into long conversations (teacher-forced text)"),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 prompts, 256 new tokens, budgets 64/128/10%%/20%% "
                        "(default: 20 prompts, 512 new tokens, budgets 64/128/256/10%%/20%%/30%%)")
    parser.add_argument("--problems", type=Path, help="MATH-500-style JSONL (`problem`, optional `solution`)")
    parser.add_argument("--solutions-only", action="store_true",
                        help="replay only the chained solutions of --problems, not the greedy traces")
    parser.add_argument("--out", type=Path, help="output directory (default results/fidelity)")
    parser.add_argument("--prompts", type=int, help="number of prompts (default: 4 quick, 20 full)")
    parser.add_argument("--new-tokens", type=int, help="greedy trace limit (default: 256 quick, 512 full)")
    parser.add_argument("--budgets", help="comma-separated, e.g. 64,128,10%%,20%%")
    parser.add_argument("--policies", help=f"comma-separated subset of {','.join(POLICY_NAMES)}")
    parser.add_argument("--solution-tokens", type=int, help="min tokens per chained-solutions conversation "
                        "(default 512)")  # fmt: skip
    parser.add_argument("--protect-prompt", action="store_true",
                        help="keep the policies' default of never evicting the prompt (kvpress does evict it)")
    parser.add_argument("--config", type=json.loads, default={},
                        help='settings and parameters for every policy run, as in --kv-evict-config (JSON), '
                             'e.g. \'{"realloc_period": 32}\' with --policies crystal')
    parser.add_argument("--no-kvpress", action="store_true", help="skip the kvpress peer")
    parser.add_argument("--no-oracle", action="store_true",
                        help=f"skip the ceilings: {report.HINDSIGHT} (eviction that knows the future) and "
                             f"{report.ORACLE} (top-k attention chosen afresh per query, budget + buffer keys)")
    parser.add_argument("--no-free-running", action="store_true",
                        help="skip the free-running decode of the greedy traces' prompts (repetition, length)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--merge", nargs="+", type=Path, metavar="RUN",
                        help="instead of running, write one report (to --out) from earlier runs on the same "
                             "sequences: their output directories or JSON files")
    args = parser.parse_args()
    merged_dirs = {(run if run.is_dir() else run.parent).resolve() for run in args.merge or ()}
    if args.merge and (args.out is None or args.out.resolve() in merged_dirs):
        parser.error("--merge writes a new report: pass --out DIR, a directory that is not one of the merged runs")
    args.out = args.out or Path("results/fidelity")
    if args.solutions_only and args.problems is None:
        parser.error("--solutions-only replays the solutions of --problems: pass --problems FILE")
    mode = MODES["quick" if args.quick else "full"]
    args.mode = "quick" if args.quick else "full"
    args.prompts = args.prompts or mode["prompts"]
    args.new_tokens = args.new_tokens or mode["new_tokens"]
    args.budgets = args.budgets.split(",") if args.budgets else list(mode["budgets"])
    args.policies = args.policies.split(",") if args.policies else list(POLICY_NAMES)
    args.solution_tokens = args.solution_tokens or mode["solution_tokens"]
    return args


def describe_sequences(sequences, budgets: list[str]) -> list[dict]:
    return [{
        "name": s.name,
        "prompt_tokens": len(s.prompt_ids),
        "continuation_tokens": len(s.continuation_ids),
        "natural_end": s.natural_end,
        "reasoning_tokens": s.labels.count(REASONING),
        "answer_tokens": s.labels.count(ANSWER),
        "budget_entries": {b: budget_entries(b, s) for b in budgets},
    } for s in sequences]  # fmt: skip


def kvpress_reference_check(reference: list[Reference], sequences, kvpress_reference: list[dict]) -> dict:
    """How closely kvpress's own full cache (its reference, other transformers version) matches ours."""
    agree, drift, count = 0, 0.0, 0
    for ours, sequence, theirs in zip((r.logits for r in reference), sequences, kvpress_reference):
        targets = torch.tensor(sequence.continuation_ids)
        nll = -torch.log_softmax(ours.double(), -1).gather(-1, targets.view(-1, 1)).squeeze(-1)
        agree += int((ours.argmax(-1) == torch.tensor(theirs["top1"])).sum())
        drift += float((nll - torch.tensor(theirs["nll"], dtype=torch.float64)).abs().sum())
        count += len(targets)
    return {"top1_agreement_with_our_full_cache": agree / count, "mean_abs_logprob_difference": drift / count}


def run_protocol(name: str, sequences, model, model_path: Path, args, settings: dict, end_of_think_ids) -> dict:
    """Replays `sequences` with our policies and kvpress; returns the protocol's JSON section."""
    greedy = name == "greedy_traces"
    labels = [s.labels for s in sequences]
    walls = {}
    started = time.monotonic()
    reference = full_cache_reference(model, sequences)
    walls["reference"] = time.monotonic() - started
    configs = [Config("none", FULL)] if "none" in args.policies else []
    configs += [Config(policy, budget) for policy in args.policies if policy != "none" for budget in args.budgets]
    started = time.monotonic()
    pad_id = model.generation_config.pad_token_id or 0
    ours = replay_policies(model, sequences, configs, reference, settings, end_of_think_ids, pad_id)
    walls["our_policies"] = time.monotonic() - started
    results: dict[str, dict] = {}
    for config, scores in ours.items():
        results.setdefault(config.policy, {})[config.budget] = summarize(scores, labels, greedy)
    if not args.no_oracle:
        started = time.monotonic()
        buffer = make_spec(COMPARED, parse_budget("100%"), settings).settings.buffer
        for budget in tqdm(args.budgets, desc=f"{report.ORACLE} ceiling", unit="budget"):
            scores = [oracle_scores(model, sequence, sequence_reference, budget_entries(budget, sequence) + buffer)
                      for sequence, sequence_reference in zip(sequences, reference)]  # fmt: skip
            results.setdefault(report.ORACLE, {})[budget] = summarize(scores, labels, greedy)
        hindsight = hindsight_scores(model, sequences, args.budgets, reference, settings, end_of_think_ids, pad_id)
        results[report.HINDSIGHT] = {budget: summarize(scores, labels, greedy) for budget, scores in hindsight.items()}
        walls["ceilings"] = time.monotonic() - started
    if greedy and not args.no_free_running:
        started = time.monotonic()
        outputs = free_run(model, sequences, configs, settings, end_of_think_ids, pad_id, eos_ids(model),
                           args.new_tokens)  # fmt: skip
        for config, summary in outputs.items():
            results[config.policy][config.budget]["free_running"] = summary
        walls["free_running"] = time.monotonic() - started
    kvpress = {"presses": list(PRESSES), "compression_interval": COMPRESSION_INTERVAL, "snapkv_window": SNAPKV_WINDOW}
    if args.no_kvpress:
        kvpress["status"] = "skipped: --no-kvpress"
    else:
        started = time.monotonic()
        budgets = {b: [budget_entries(b, s) for s in sequences] for b in args.budgets}
        try:
            scores, kvpress_reference, versions = run_kvpress(model_path, sequences, budgets, args.threads)
        except RuntimeError as error:
            kvpress["status"] = f"skipped: {error}"
        else:
            for (press, budget), press_scores in scores.items():
                results.setdefault(press, {})[budget] = summarize(press_scores, labels, greedy)
            kvpress.update(status="ok", versions=versions,
                           reference_check=kvpress_reference_check(reference, sequences, kvpress_reference))
        walls["kvpress"] = time.monotonic() - started
        print(f"kvpress: {kvpress['status']}")
    sanity = results.get("none", {}).get(FULL)
    return {
        "replayed": PROTOCOLS[name][1],
        "sequences": describe_sequences(sequences, args.budgets),
        "results": results,
        "full_cache_sanity": None if sanity is None else {
            "top1_agreement": sanity["all"]["top1_agreement"], "mean_kl": sanity["all"]["mean_kl"],
            "ok": sanity["all"]["top1_agreement"] == 1.0 and sanity["all"]["mean_kl"] < 1e-6,
        },
        "kvpress": kvpress,
        "wall_seconds": walls,
    }  # fmt: skip


def protocol_heading(name: str, section: dict) -> str:
    lengths = [s["continuation_tokens"] for s in section["sequences"]]
    text = (f"{name}: {section['replayed']}; {len(lengths)} sequences, {sum(lengths)} scored positions (lengths "
            f"{min(lengths)}-{max(lengths)}")  # fmt: skip
    if name == "greedy_traces":
        text += f", {sum(s['natural_end'] for s in section['sequences'])} ended by themselves"
    text += ")."
    sanity = section["full_cache_sanity"]
    if sanity is not None:
        text += (f" Sanity: `none` replayed through `EvictingCache` agrees {sanity['top1_agreement']:.3f} with the "
                 f"full cache, KL {sanity['mean_kl']:.1e}.")  # fmt: skip
    kvpress = section["kvpress"]
    text += f" kvpress: {kvpress['status']}"
    if kvpress["status"] == "ok":
        check = kvpress["reference_check"]
        text += (f" (kvpress {kvpress['versions']['kvpress']}, transformers {kvpress['versions']['transformers']}; its "
                 f"full cache agrees {check['top1_agreement_with_our_full_cache']:.3f} with ours, mean |log-prob "
                 f"difference| {check['mean_abs_logprob_difference']:.1e})")  # fmt: skip
    return text + "."


def replayed_text(data: dict) -> str:
    parts = []
    if "greedy_traces" in data["protocols"]:
        parts.append(f"greedy traces of at most {data['new_tokens']} new tokens")
    if "math500_solutions" in data["protocols"]:
        minimum = data.get("solution_tokens")
        parts.append("chained solutions" + (f" of at least {minimum} tokens" if minimum else ""))
    return " and ".join(parts)


def ran_kvpress(data: dict) -> bool:
    return any(section.get("kvpress", {}).get("status") == "ok" for section in data["protocols"].values())


def write_outputs(data: dict, out: Path) -> None:
    mode = data["mode"]
    suffix = "-quick" if mode == "quick" else ""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"fidelity{suffix}.json").write_text(json.dumps(data, indent=1))
    lines = [
        f"# Fidelity to the full cache ({mode} mode)", "",
        f"`{data['command']}`: model {data['model']}, prompts from {data['prompts']}, {replayed_text(data)}, "
        f"{data['torch_threads']} torch threads, {data['wall_seconds_total']:.0f} s.",
        *(["", "Merged from:", *(f"- `{command}`" for command in data["merged_from"])] if "merged_from" in data
          else []),
        "", f"- Budgets: {data['settings_note']}.",
        *([f"- Policy parameters: {policy_params_text(data['policy_params'])}."] if data.get("policy_params") else []),
        f"- {ANSWER_RULE}.",
        *([f"- kvpress: `DecodingPress(compression_interval={COMPRESSION_INTERVAL}, target_size=budget)` around "
           f"`SnapKVPress(window_size={SNAPKV_WINDOW})`, `StreamingLLMPress()` and `KnormPress()`, as shipped, in "
           "its own environment."] if ran_kvpress(data) else []),
        "",
    ]  # fmt: skip
    for name, section in data["protocols"].items():
        prefix = PROTOCOLS[name][0]
        heading = protocol_heading(name, section)
        print(f"\n== {heading}")
        lines += [f"## {name}", "", heading, ""]
        for metric in report.METRICS:
            if not report.has_values(section["results"], metric):
                continue
            title = report.METRICS[metric][0]
            print(f"\n-- {title}\n{report.text_table(section['results'], metric)}")
            lines += [f"**{title}**", "", report.markdown_table(section["results"], metric), ""]
            if metric in report.PLOTTED:
                path = out / f"fidelity{suffix}-{prefix}{metric}.png"
                report.plot_metric(section["results"], metric, f"{title} ({name}, {mode})", path)
        if COMPARED in section["results"]:
            for metric, (_, label, _, _) in report.PAIRED.items():
                header, rows = report.comparison_rows(section["results"], COMPARED, metric)
                title = (f"{COMPARED} minus each peer, {label} (all scored tokens): difference [95 % bootstrap "
                         "interval over sequences]; better/worse where the interval excludes 0")
                print(f"\n-- {title}\n{report.text(header, rows)}")
                lines += [f"**{title}**", "", report.markdown(header, rows), ""]
    (out / f"summary{suffix}.md").write_text("\n".join(lines))
    print(f"\nwrote {out / f'fidelity{suffix}.json'}, {out / f'summary{suffix}.md'} and the plots")


def recorded_settings(protect_prompt: bool, config: dict) -> dict:
    """The eviction settings a run records. The reallocation settings are recorded even at their defaults: runs made
    before a default changed lack a key or differ in it, so `--merge` will not put their `crystal` rows into a newer
    report."""
    defaults = {key: getattr(Settings, key) for key in ("sinks", "window", "buffer", *REALLOCATION_SETTINGS)}
    return {"protect_prompt": protect_prompt, **defaults, **config}


def recorded_params(policies: list[str], settings: dict) -> dict:
    """Each replayed policy's parameters as it ran, defaults included: a reader sees which `crystal` a report
    measured, and `--merge` keeps a policy's rows only from runs that agree on them."""
    specs = {policy: make_spec(policy, parse_budget("100%"), settings) for policy in policies}
    return {policy: dataclasses.asdict(spec.params) for policy, spec in specs.items() if spec.params is not None}


def policy_params_text(params: dict) -> str:
    return "; ".join(f"`{policy}` " + ", ".join(f"{key} {value}" for key, value in values.items())
                     for policy, values in params.items())  # fmt: skip


def invocation() -> str:
    """This run's command line as a shell would take it back (a `--config` JSON stays one quoted word)."""
    return shlex.join(["python", "-m", "benchmarks.fidelity", *sys.argv[1:]])


def main() -> None:
    args = parse_args()
    if args.merge:
        try:
            write_outputs(merge_runs([load_run(path) for path in args.merge], invocation()), args.out)
        except (MergeError, OSError, KeyError) as error:
            sys.exit(f"--merge: {error}")
        return
    torch.set_num_threads(args.threads)
    started = time.monotonic()
    model_path, tokenizer, model = load_default_model()
    settings = {**({} if args.protect_prompt else EVICTABLE_PROMPT), **args.config}
    end_of_think_ids = tuple(tokenizer.encode("</think>", add_special_tokens=False))
    problems = load_problems(args.problems, args.prompts)
    protocols = {}
    data = {
        "mode": args.mode,
        "command": invocation(),
        "model": model_path.name,
        "prompts": args.problems.name if args.problems else "crystal_sglang.prompts.DEFAULT_PROBLEMS",
        "instruction": INSTRUCTION,
        "new_tokens": args.new_tokens,
        "solution_tokens": args.solution_tokens,
        "budgets": args.budgets,
        "eviction_settings": recorded_settings(args.protect_prompt, args.config),
        "policy_params": recorded_params(args.policies, settings),
        "settings_note": ("every entry counts toward the budget, prompt included, as in kvpress (`protect_prompt` off; "
                          f"sinks {Settings.sinks}, window {Settings.window}, buffer {Settings.buffer})"
                          if not args.protect_prompt else
                          "policies keep their default of never evicting the prompt")
                         + (f"; every policy with `--config {json.dumps(args.config)}`" if args.config else ""),
        "answer_rule": ANSWER_RULE,
        "metrics": {
            "top1_agreement": "share of scored tokens where the policy's top-1 next token is the full cache's",
            "mean_kl": "mean over scored tokens of KL(full || policy) of the next-token distributions, nats",
            "perplexity": "exp(mean negative log-likelihood of the replayed token) under the policy",
            "top1_accuracy": "share of scored tokens where the policy's top-1 next token is the replayed token (on "
                             "the model's own greedy traces the full cache's is 1 by construction)",
            "greedy_match": "scored tokens before the first top-1 disagreement = how long free-running greedy "
                            "decoding with the policy reproduces the full cache's trace (same inputs until then)",
            "attention_recall": "mean over scored tokens of the share of the full cache's attention (from the "
                                "predicting position, mean over layers and KV heads) on the entries the policy "
                                "held (our policies only: kvpress does not say which positions it keeps)",
            report.HINDSIGHT: "not a policy but a ceiling for eviction: evicts as the policies do (same protection, "
                              "budget, buffer) keeping the entries the full cache's later queries attend to most",
            report.ORACLE: "not a policy but a ceiling, oracle top-k attention: at every position each KV head "
                           "attends to the budget + buffer keys its query group weights most, chosen afresh with "
                           "the query in hand (no eviction policy can bring entries back)",
            "free_running": "greedy decoding of the traces' prompts from the policy's own predictions (budgets as "
                            "in the replay, same token limit): mean length, outputs that ended by themselves, share "
                            "of repeated 4-grams, outputs identical to the full cache's trace (our policies only)",
        },
        "torch_threads": args.threads,
        "protocols": protocols,
        "wall_seconds_total": 0.0,
    }  # fmt: skip

    def finished(name: str, section: dict) -> None:
        """Record a protocol's results and write every output: a stopped run keeps the protocols it finished."""
        protocols[name] = section
        data["wall_seconds_total"] = time.monotonic() - started
        write_outputs(data, args.out)

    if not args.solutions_only:
        traces_started = time.monotonic()
        traces = greedy_traces(model, tokenizer, problems, args.new_tokens)
        trace_seconds = time.monotonic() - traces_started
        section = run_protocol("greedy_traces", traces, model, model_path, args, settings, end_of_think_ids)
        section["wall_seconds"]["traces"] = trace_seconds
        finished("greedy_traces", section)
    if args.problems is not None:
        records = solution_records(args.problems)
        if args.solutions_only and not records:
            sys.exit(f"--solutions-only: no record in {args.problems} has a `solution` to replay")
        if records:
            solutions = solution_sequences(tokenizer, records, args.prompts, args.solution_tokens)
            finished("math500_solutions", run_protocol("math500_solutions", solutions, model, model_path, args,
                                                       settings, end_of_think_ids))  # fmt: skip
    print(f"total wall time {data['wall_seconds_total']:.0f} s")


if __name__ == "__main__":
    main()
