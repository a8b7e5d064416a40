"""The peer: NVIDIA's kvpress, its decoding-time press (`DecodingPress`) around SnapKV, StreamingLLM and KNorm,
replaying the same sequences at the same budgets, scored by the same code (`scoring.compare`).

kvpress needs transformers < 5.3, so it runs from its own virtual environment as a subprocess:

    python -m venv .venv-kvpress && .venv-kvpress/bin/pip install kvpress    # once
    .venv-kvpress/bin/python -m benchmarks.fidelity.kvpress_runner INPUT.json OUTPUT.json   # run by the benchmark

`run_kvpress` (our side) writes the sequences and per-row budgets, runs this module in that environment and reads
the per-token scores back; `main` (kvpress's side) replays them. The rows of one sequence (its full cache, the
reference, and every press at every budget) form one batch; each row's compression is kvpress's own
`DecodingPress.compress` applied to that row alone (`RowwiseDecodingPress`), so a row is compressed exactly as it
would be alone, and rows stay in one rectangular cache by padding shorter rows with masked slots.
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

from benchmarks.fidelity.scoring import ReplayScores, TokenScores, right_padded

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
    over a batch whose rows each have their own press (a `DecodingPress`, or None for the full cache).

    `mask` [B, K] marks each row's real entries among the K physical ones (including the current token); at a
    compression each row's real entries go through its own press, the results are right-padded to one width, and
    `compressed_mask` tells the caller the new layout (the same in every layer)."""

    row_presses: list = field(default_factory=list)
    mask: torch.Tensor | None = None
    compressed_mask: torch.Tensor | None = None

    def post_init_from_model(self, model):
        for press in self.row_presses:
            if press is not None:
                press.post_init_from_model(model)

    def compress(self, module, hidden_states, keys, values, attentions, kwargs):
        cos, sin = kwargs["position_embeddings"]
        kept_keys, kept_values = [], []
        for row, press in enumerate(self.row_presses):
            real = self.mask[row]
            row_keys, row_values = keys[row : row + 1, :, real], values[row : row + 1, :, real]
            if press is not None:
                row_kwargs = {**kwargs, "position_embeddings": (cos[row : row + 1], sin[row : row + 1])}
                row_keys, row_values = press.compress(module, hidden_states[row : row + 1], row_keys, row_values,
                                                      None, row_kwargs)  # fmt: skip
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
def replay_presses(model, sequences: list[dict], rows: list[tuple[str | None, str | None, int]], pad_id: int,
                   progress) -> tuple[list[TokenScores], dict[int, list[int]]]:  # fmt: skip
    """Teacher-forced replay of `rows` (press, budget label, sequence index; press None: the full cache, one per
    sequence, the reference). Returns per row its TokenScores (reference rows: against themselves) and, per
    reference row's sequence, its top-1 tokens."""
    reference_row = {index: row for row, (press, _, index) in enumerate(rows) if press is None}
    prompts = [sequences[index]["prompt_ids"] for _, _, index in rows]
    continuations = [sequences[index]["continuation_ids"] for _, _, index in rows]
    lengths = [len(c) for c in continuations]
    ids = right_padded(prompts, pad_id)
    batch, longest = ids.shape
    prompt_lengths = torch.tensor([len(p) for p in prompts])
    mask = torch.arange(longest).view(1, -1) < prompt_lengths.view(-1, 1)
    row_presses = [None if press is None else make_press(press, sequences[index]["targets"][label])
                   for press, label, index in rows]  # fmt: skip
    driver = RowwiseDecodingPress(base_press=ScorerPress(), compression_interval=COMPRESSION_INTERVAL,
                                  row_presses=row_presses)  # fmt: skip
    from transformers import DynamicCache

    cache = DynamicCache()
    recorded = ReplayScores(batch)
    top1: dict[int, list[int]] = {index: [] for index in reference_row}
    with driver(model):
        positions = torch.arange(longest).view(1, -1).expand(batch, -1)
        hidden = model.model(input_ids=ids, attention_mask=mask.long(), position_ids=positions, past_key_values=cache)
        logits = model.lm_head(hidden.last_hidden_state[torch.arange(batch), prompt_lengths - 1])
        for step in range(max(lengths)):
            live = [row for row in range(batch) if step < lengths[row]]
            references = torch.stack([logits[reference_row[rows[row][2]]] for row in live])
            targets = torch.tensor([continuations[row][step] for row in live])
            recorded.record(live, references, logits[live], targets, mask.sum(1).float().tolist())
            for index, row in reference_row.items():
                if step < lengths[row]:
                    top1[index].append(int(logits[row].argmax()))
            progress.update()
            if step + 1 == max(lengths):
                break
            fed = torch.tensor([[c[step] if step < len(c) else pad_id] for c in continuations])
            mask = torch.cat([mask, torch.ones(batch, 1, dtype=torch.bool)], dim=1)
            driver.mask, driver.compressed_mask = mask, None
            output = model(input_ids=fed, attention_mask=mask.long(), position_ids=prompt_lengths.view(-1, 1) + step,
                           past_key_values=cache, logits_to_keep=1)  # fmt: skip
            if driver.compressed_mask is not None:
                mask = driver.compressed_mask
            logits = output.logits[:, -1]
    return recorded.rows, top1


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
    pad_id = model.generation_config.pad_token_id or 0
    configs: dict[tuple[str, str], list[dict]] = {}
    reference = []
    steps = sum(len(sequence["continuation_ids"]) for sequence in sequences)
    with tqdm(total=steps, desc=f"kvpress presses ({len(request['presses'])} presses)", unit="token") as progress:
        for index in range(len(sequences)):  # one batch per sequence: its rows stop together
            rows = [(None, None, index)] + [(press, label, index) for press in request["presses"]
                                            for label in request["budgets"]]  # fmt: skip
            scores, top1 = replay_presses(model, sequences, rows, pad_id, progress)
            reference.append({"top1": top1[index], "nll": scores[0].nll})
            for (press, label, _), row_scores in zip(rows[1:], scores[1:]):
                configs.setdefault((press, label), []).append(row_scores.__dict__)
    Path(reply_path).write_text(json.dumps({
        "configs": [{"press": p, "budget": b, "sequences": s} for (p, b), s in configs.items()],
        "reference": reference,
        "versions": {"kvpress": version("kvpress"), "transformers": transformers.__version__,
                     "torch": torch.__version__},
    }))  # fmt: skip


if __name__ == "__main__":
    main()
