"""Fine-tuning data: read records, check them, render chats, encode with loss masks, pack, batch.

Records come from JSONL files (one object a line) or Parquet parts (one row a record):

- `sft`: `{"messages": [{"role", "content"}, ...]}` or `{"instruction", "input", "output"}`
  (turned into a user turn and an assistant turn);
- `dpo`: `{"prompt", "chosen", "rejected"}`;
- `classify`: `{"text", <label_key>}`.

A record that does not fit (bad JSON, a missing key, no assistant turn, chosen equal to rejected,
too long for the model, a label unseen in training at eval) is kept out and counted under its
reason; it never stops the run. Records are split into train and held-out by a hash of their
content, so the split does not depend on file order. Batches are a pure function of (seed, step):
each epoch is a seeded permutation, which is what makes resume exact.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from tokenizers import Tokenizer

ROLES = ("system", "user", "assistant")

# The chat format, as the Jinja template that `tokenizer_config.json` carries for
# `apply_chat_template`; `render_chat` writes the same text and also returns where each assistant
# reply is (tests check the two agree). The markers are plain text: no new embeddings are needed.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


class RecordError(ValueError):
    """A record that cannot be used; the message is the reason it is counted under."""


@dataclass
class Removed:
    """Records kept out: count per reason and the first few places (file:line) for each."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        places = self.examples.setdefault(reason, [])
        if len(places) < 5:
            places.append(where)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def read_records(paths: list[Path], removed: Removed) -> Iterator[tuple[str, dict]]:
    """(`file:line`, record) for every record of every JSONL or Parquet file; a line that is not
    a JSON object is counted in `removed`."""
    for path in paths:
        if path.suffix == ".parquet":
            for row, record in enumerate(pq.read_table(path).to_pylist()):
                yield f"{path}:{row}", record
            continue
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    removed.add(f"not JSON ({error.msg})", where)
                    continue
                if not isinstance(record, dict):
                    removed.add("not a JSON object", where)
                    continue
                yield where, record


def is_held_out(record: dict, fraction: float) -> bool:
    """True for about `fraction` of records, decided by a hash of the record's content."""
    digest = hashlib.sha256(json.dumps(record, sort_keys=True, ensure_ascii=False).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def _text(record: dict, key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise RecordError(f"'{key}' missing or not a string")
    return value


def to_messages(record: dict) -> list[dict[str, str]]:
    """A record's chat: its `messages`, or instruction/input/output as a user and an assistant turn."""
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise RecordError("'messages' is not a non-empty list")
        for message in messages:
            if not isinstance(message, dict) or message.get("role") not in ROLES or not isinstance(message.get("content"), str):
                raise RecordError(f"a message is not {{'role': one of {ROLES}, 'content': text}}")
        if not any(m["role"] == "assistant" for m in messages):
            raise RecordError("messages have no assistant turn")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    if "instruction" in record:
        instruction, output = _text(record, "instruction"), _text(record, "output")
        extra = record.get("input") or ""
        if not isinstance(extra, str):
            raise RecordError("'input' is not a string")
        prompt = f"{instruction}\n\n{extra}" if extra else instruction
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    raise RecordError("neither 'messages' nor 'instruction'/'output'")


def to_pair(record: dict) -> tuple[str, str, str]:
    prompt, chosen, rejected = _text(record, "prompt"), _text(record, "chosen"), _text(record, "rejected")
    if chosen == rejected:
        raise RecordError("chosen and rejected are identical")
    return prompt, chosen, rejected


def to_labelled(record: dict, label_key: str) -> tuple[str, str]:
    label = record.get(label_key)
    if label is None or isinstance(label, (dict, list)):
        raise RecordError(f"'{label_key}' missing or not a scalar label")
    return _text(record, "text"), str(label)


def render_chat(messages: list[dict[str, str]], eos_token: str, add_generation_prompt: bool = False
                ) -> tuple[str, list[tuple[int, int]]]:
    """The chat as text (what `CHAT_TEMPLATE` renders) and the character spans of the assistant
    replies, each including the EOS token that ends it (the model learns to stop)."""
    text, spans = "", []
    for message in messages:
        text += f"<|{message['role']}|>\n"
        start = len(text)
        text += message["content"]
        if message["role"] == "assistant":
            text += eos_token
            spans.append((start, len(text)))
        text += "\n"
    if add_generation_prompt:
        text += "<|assistant|>\n"
    return text, spans


def encode_chat(tokenizer: Tokenizer, messages: list[dict[str, str]], eos_token: str) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of the rendered chat and a boolean mask, True on the tokens of assistant replies."""
    text, spans = render_chat(messages, eos_token)
    encoding = tokenizer.encode(text, add_special_tokens=False)
    ids = np.array(encoding.ids, dtype=np.int64)
    mask = np.array(
        [any(s <= start and end <= e for s, e in spans) and end > start for start, end in encoding.offsets], dtype=bool
    )
    return ids, mask


def shifted(ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inputs ids[:-1] and targets ids[1:], targets set to -1 where the mask says no loss."""
    return ids[:-1], np.where(mask[1:], ids[1:], -1)


@dataclass
class Rows:
    """Fixed-length rows of inputs, targets (-1: no loss) and packed-example ids (None: one
    example a row, padding at the end)."""

    x: np.ndarray
    y: np.ndarray
    document_ids: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.x)


def pack(examples: list[tuple[np.ndarray, np.ndarray]], seq_len: int, pad_id: int, packed: bool) -> Rows:
    """Lay (inputs, targets) examples into rows of `seq_len`: greedily several per row when
    `packed` (each row's `document_ids` number its examples; padding gets -1), else one a row."""
    rows: list[list[tuple[np.ndarray, np.ndarray]]] = []
    used = seq_len  # forces a first row
    for x, y in examples:
        if not packed or used + len(x) > seq_len:
            rows.append([])
            used = 0
        rows[-1].append((x, y))
        used += len(x)
    xs = np.full((len(rows), seq_len), pad_id, dtype=np.int64)
    ys = np.full((len(rows), seq_len), -1, dtype=np.int64)
    docs = np.full((len(rows), seq_len), -1, dtype=np.int64)
    for r, row in enumerate(rows):
        at = 0
        for j, (x, y) in enumerate(row):
            xs[r, at : at + len(x)], ys[r, at : at + len(x)], docs[r, at : at + len(x)] = x, y, j
            at += len(x)
    return Rows(xs, ys, docs if packed else None)


def row_indices(n: int, step: int, rows_per_step: int, first_row: int, count: int, seed: int) -> np.ndarray:
    """Indices into `n` rows of rows first_row .. first_row + count of step `step`'s global batch
    (`rows_per_step` rows): training walks through a seeded permutation of the rows per epoch."""
    positions = (step - 1) * rows_per_step + first_row + np.arange(count)
    epochs, offsets = np.divmod(positions, n)
    out = np.empty(count, dtype=np.int64)
    for epoch in np.unique(epochs):
        here = epochs == epoch
        out[here] = np.random.default_rng([seed, int(epoch)]).permutation(n)[offsets[here]]
    return out


@dataclass
class Split:
    """Encoded examples of one split; `labels` only for classification."""

    rows: Rows
    lengths: np.ndarray  # tokens of each row's content (one example a row), or of each packed row
    examples: np.ndarray  # examples in each row (several when packed)
    chosen_rows: Rows | None = None  # dpo: `rows` holds the rejected replies; one pair a row
    labels: np.ndarray | None = None


def padded(examples: list[tuple[np.ndarray, np.ndarray]], seq_len: int, pad_id: int) -> tuple[Rows, np.ndarray]:
    return pack(examples, seq_len, pad_id, packed=False), np.array([len(x) for x, _ in examples], dtype=np.int64)


def encode_records(
    method: str,
    records: Iterator[tuple[str, dict]],
    tokenizer: Tokenizer,
    eos_id: int,
    seq_len: int,
    holdout_fraction: float,
    removed: Removed,
    label_key: str = "label",
) -> tuple[list, list]:
    """(train, held-out) lists of encoded examples: sft (x, y); dpo ((x, y) chosen, (x, y)
    rejected); classify (ids, label). Records that do not fit go to `removed`."""
    eos_token = tokenizer.id_to_token(eos_id)
    train, holdout = [], []
    for where, record in records:
        try:
            if method == "sft":
                example = shifted(*encode_chat(tokenizer, to_messages(record), eos_token))
                longest = len(example[0])
            elif method == "dpo":
                prompt, chosen, rejected = to_pair(record)
                example = tuple(
                    shifted(*encode_chat(tokenizer, [{"role": "user", "content": prompt},
                                                     {"role": "assistant", "content": reply}], eos_token))
                    for reply in (chosen, rejected)
                )
                longest = max(len(example[0][0]), len(example[1][0]))
            else:
                text, label = to_labelled(record, label_key)
                ids = np.array(tokenizer.encode(text, add_special_tokens=False).ids[:seq_len], dtype=np.int64)
                if not len(ids):
                    raise RecordError("'text' is empty")
                example, longest = (ids, label), len(ids)
            if longest > seq_len:
                raise RecordError(f"longer than the model's seq_len ({seq_len} tokens)")
        except RecordError as error:
            removed.add(str(error), where)
            continue
        (holdout if is_held_out(record, holdout_fraction) else train).append(example)
    return train, holdout


def make_split(method: str, examples: list, seq_len: int, pad_id: int, packed: bool, labels: list[str],
               removed: Removed | None = None) -> Split:
    """Arrays for one split. Classification examples whose label is not in `labels` (seen in
    training) go to `removed`."""
    if method == "sft":
        rows = pack(examples, seq_len, pad_id, packed)
        if packed:
            return Split(rows, (rows.document_ids != -1).sum(1), rows.document_ids.max(1) + 1)
        return Split(rows, np.array([len(x) for x, _ in examples], dtype=np.int64), np.ones(len(rows), dtype=np.int64))
    if method == "dpo":
        chosen, chosen_lengths = padded([c for c, _ in examples], seq_len, pad_id)
        rejected, rejected_lengths = padded([r for _, r in examples], seq_len, pad_id)
        lengths = np.maximum(chosen_lengths, rejected_lengths)
        return Split(rejected, lengths, np.ones(len(rejected), dtype=np.int64), chosen_rows=chosen)
    index = {label: i for i, label in enumerate(labels)}
    known = []
    for ids, label in examples:
        if label in index:
            known.append((ids, index[label]))
        elif removed is not None:
            removed.add(f"label {label!r} not among the training labels", "held-out split")
    rows, lengths = padded([(ids, np.full_like(ids, -1)) for ids, _ in known], seq_len, pad_id)
    return Split(rows, lengths, np.ones(len(rows), dtype=np.int64), labels=np.array([i for _, i in known], dtype=np.int64))
