"""The peer: NVIDIA's kvpress, its decoding-time press (`DecodingPress`) around SnapKV, StreamingLLM and KNorm,
replaying the same sequences at the same budgets, scored by the same code (`scoring.compare`).

kvpress needs transformers < 5.3, so it runs from its own virtual environment as a subprocess:

    python -m venv .venv-kvpress && .venv-kvpress/bin/pip install kvpress    # once
    .venv-kvpress/bin/python -m benchmarks.fidelity.kvpress_runner INPUT.json OUTPUT.json   # run by the benchmark

`run_kvpress` (our side) writes the sequences and per-row budgets, runs this module in that environment and reads
the per-token scores back; `main` (kvpress's side) replays them. The reference is kvpress's own full cache (one
teacher-forced forward per sequence); every press at every budget replays the sequence as one row of a batch, each
row's compression being kvpress's own `DecodingPress.compress` applied to that row alone (`RowwiseDecodingPress`),
so a row is compressed exactly as it would be alone, and rows stay in one rectangular cache by padding shorter rows
with masked slots.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.fidelity.scoring import ReplayScores, TokenScores

try:  # kvpress's environment; in ours only the launcher (`run_kvpress`) is used
    from kvpress import DecodingPress, KnormPress, SnapKVPress, StreamingLLMPress
    from kvpress.presses.scorer_press import ScorerPress
except ImportError:
    DecodingPress = object

PRESSES = ("kvpress-snapkv", "kvpress-streamingllm", "kvpress-knorm")
COMPRESSION_INTERVAL = 16  # = our policies' buffer: both oscillate between budget and budget + 16
SNAPKV_WINDOW = 8  # = our observation window; must stay below the interval (the buffered hidden states)
REPO_ROOT = Path(__file__).resolve().parents[2]


# ---- our side --------------------------------------------------------------------------------------------------
def kvpress_python() -> Path | None:
    """`$KVPRESS_PYTHON`, else the repository's `.venv-kvpress`; None when neither exists."""
    path = Path(os.environ.get("KVPRESS_PYTHON") or REPO_ROOT / ".venv-kvpress" / "bin" / "python")
    return path if path.is_file() else None


def run_kvpress(model_path, sequences, budgets: dict[str, list[int]], threads: int):
    """Replays `sequences` with every press at every budget label (`budgets[label]`: entries per sequence).

    Returns ({(press, label): [TokenScores per sequence]}, the reference rows' {"top1", "nll"} per sequence,
    versions), or raises RuntimeError with the reason kvpress could not run."""
    python = kvpress_python()
    if python is None:
        raise RuntimeError("no kvpress environment: create it with `python -m venv .venv-kvpress && "
                           ".venv-kvpress/bin/pip install kvpress` (or set KVPRESS_PYTHON)")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="fidelity-kvpress-") as workdir:
        request, reply = Path(workdir) / "input.json", Path(workdir) / "output.json"
        request.write_text(json.dumps({
            "model": str(model_path), "threads": threads, "presses": list(PRESSES), "budgets": budgets,
            "sequences": [sequence.to_json() for sequence in sequences],
        }))  # fmt: skip
        command = [str(python), "-m", "benchmarks.fidelity.kvpress_runner", str(request), str(reply)]
        environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        done = subprocess.run(command, cwd=REPO_ROOT, stdout=sys.stderr, env=environment)
        if done.returncode != 0 or not reply.is_file():
            raise RuntimeError(f"the kvpress runner failed (exit {done.returncode}); its output is above")
        data = json.loads(reply.read_text())
    scores = {(row["press"], row["budget"]): [TokenScores(**s) for s in row["sequences"]] for row in data["configs"]}
    return scores, data["reference"], data["versions"]


# ---- kvpress's side --------------------------------------------------------------------------------------------
@dataclass
class RowwiseDecodingPress(DecodingPress):
    """kvpress's `DecodingPress` schedule (hidden-state buffer, a compression every `compression_interval` steps)
    over a batch whose rows each have their own press (a `DecodingPress`).

    `mask` [B, K] marks each row's real entries among the K physical ones (including the current token); at a
    compression each row's real entries go through its own press, the results are right-padded to one width, and
    `compressed_mask` tells the caller the new layout (the same in every layer)."""

    row_presses: list = field(default_factory=list)
    mask: torch.Tensor | None = None
    compressed_mask: torch.Tensor | None = None

    def post_init_from_model(self, model):
        for press in self.row_presses:
            press.post_init_from_model(model)

    def compress(self, module, hidden_states, keys, values, attentions, kwargs):
        cos, sin = kwargs["position_embeddings"]
        kept_keys, kept_values = [], []
        for row, press in enumerate(self.row_presses):
            real = self.mask[row]
            row_keys, row_values = keys[row : row + 1, :, real], values[row : row + 1, :, real]
            row_kwargs = {**kwargs, "position_embeddings": (cos[row : row + 1], sin[row : row + 1])}
            row_keys, row_values = press.compress(module, hidden_states[row : row + 1], row_keys, row_values, None,
                                                  row_kwargs)  # fmt: skip
            kept_keys.append(row_keys)
            kept_values.append(row_values)
        width = max(k.shape[2] for k in kept_keys)
        lengths = torch.tensor([k.shape[2] for k in kept_keys])
        self.compressed_mask = torch.arange(width).view(1, -1) < lengths.view(-1, 1)
        pad = [(0, 0, 0, width - k.shape[2]) for k in kept_keys]
        return (torch.cat([F.pad(k, p) for k, p in zip(kept_keys, pad)]),
                torch.cat([F.pad(v, p) for v, p in zip(kept_values, pad)]))  # fmt: skip


def make_press(name: str, target: int):
    scorer = {
        "kvpress-snapkv": lambda: SnapKVPress(window_size=SNAPKV_WINDOW),
        "kvpress-streamingllm": lambda: StreamingLLMPress(),
        "kvpress-knorm": lambda: KnormPress(),
    }[name]()
    return DecodingPress(base_press=scorer, compression_interval=COMPRESSION_INTERVAL, target_size=target)


@torch.no_grad()
def full_cache_logits(model, sequence: dict) -> torch.Tensor:
    """kvpress's own full cache (its transformers version): next-token logits [continuation, V] of one sequence, from
    one teacher-forced forward over prompt + continuation."""
    prompt, continuation = sequence["prompt_ids"], sequence["continuation_ids"]
    ids = torch.tensor([prompt + continuation[:-1]])
    hidden = model.model(input_ids=ids).last_hidden_state
    return model.lm_head(hidden[0, len(prompt) - 1 :]).float()


@torch.no_grad()
def replay_presses(model, sequence: dict, rows: list[tuple[str, str]], reference: torch.Tensor,
                   progress) -> list[TokenScores]:
    """Teacher-forced replay of one sequence by `rows` (press, budget label) in one batch, each step scored against
    `reference` (the full cache's logits). Rows hold only what their presses keep, so the batch is as wide as its
    largest budget (+ the interval), not as the sequence."""
    batch, prompt, continuation = len(rows), sequence["prompt_ids"], sequence["continuation_ids"]
    ids = torch.tensor([prompt] * batch)
    mask = torch.ones((batch, len(prompt)), dtype=torch.bool)
    row_presses = [make_press(press, sequence["targets"][label]) for press, label in rows]
    driver = RowwiseDecodingPress(base_press=ScorerPress(), compression_interval=COMPRESSION_INTERVAL,
                                  row_presses=row_presses)  # fmt: skip
    from transformers import DynamicCache

    cache = DynamicCache()
    recorded = ReplayScores(batch)
    every = list(range(batch))
    with driver(model):
        hidden = model.model(input_ids=ids, past_key_values=cache)
        logits = model.lm_head(hidden.last_hidden_state[:, -1])
        for step, token in enumerate(continuation):
            targets = torch.tensor([token] * batch)
            recorded.record(every, reference[step].expand(batch, -1), logits, targets, mask.sum(1).float().tolist())
            progress.update()
            if step + 1 == len(continuation):
                break
            mask = torch.cat([mask, torch.ones(batch, 1, dtype=torch.bool)], dim=1)
            driver.mask, driver.compressed_mask = mask, None
            output = model(input_ids=targets.view(-1, 1), attention_mask=mask.long(),
                           position_ids=torch.full((batch, 1), len(prompt) + step), past_key_values=cache,
                           logits_to_keep=1)  # fmt: skip
            if driver.compressed_mask is not None:
                mask = driver.compressed_mask
            logits = output.logits[:, -1]
    return recorded.rows


def main() -> None:
    from importlib.metadata import version

    import transformers
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    request_path, reply_path = sys.argv[1:3]
    request = json.loads(Path(request_path).read_text())
    torch.set_num_threads(request["threads"])
    model = AutoModelForCausalLM.from_pretrained(request["model"], dtype=torch.float32).eval()
    model.config._attn_implementation = "sdpa"
    sequences = request["sequences"]
    for index, sequence in enumerate(sequences):
        sequence["targets"] = {label: entries[index] for label, entries in request["budgets"].items()}
    configs: dict[tuple[str, str], list[dict]] = {}
    reference = []
    rows = [(press, label) for press in request["presses"] for label in request["budgets"]]
    steps = sum(len(sequence["continuation_ids"]) for sequence in sequences)
    with tqdm(total=steps, desc=f"kvpress presses ({len(request['presses'])} presses)", unit="token") as progress:
        for sequence in sequences:  # one batch per sequence: its rows stop together
            logits = full_cache_logits(model, sequence)
            targets = torch.tensor(sequence["continuation_ids"])
            nll = -torch.log_softmax(logits, -1).gather(-1, targets.view(-1, 1)).squeeze(-1)
            reference.append({"top1": logits.argmax(-1).tolist(), "nll": nll.tolist()})
            for (press, label), row_scores in zip(rows, replay_presses(model, sequence, rows, logits, progress)):
                configs.setdefault((press, label), []).append(row_scores.__dict__)
    Path(reply_path).write_text(json.dumps({
        "configs": [{"press": p, "budget": b, "sequences": s} for (p, b), s in configs.items()],
        "reference": reference,
        "versions": {"kvpress": version("kvpress"), "transformers": transformers.__version__,
                     "torch": torch.__version__},
    }))  # fmt: skip


if __name__ == "__main__":
    main()
