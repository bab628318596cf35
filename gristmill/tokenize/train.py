"""Train a tokenizer from a stream of documents and save it as a `transformers`-loadable folder.

A saved folder holds `tokenizer.json` (the `tokenizers` file), `tokenizer_config.json` and
`special_tokens_map.json` (what `AutoTokenizer.from_pretrained(folder)` reads) and `spec.json`
(the recipe it was trained with).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from gristmill.pipeline import io
from gristmill.tokenize import recipes
from gristmill.tokenize.corpus import Sample, iter_texts
from gristmill.tokenize.recipes import TokenizerSpec

TOKENIZER_FILE = "tokenizer.json"
SPEC_FILE = "spec.json"

# Which `transformers` role each default special token plays.
SPECIAL_ROLES = {
    "<|endoftext|>": ["eos_token", "bos_token"],
    "[PAD]": ["pad_token"],
    "[UNK]": ["unk_token"],
    "[CLS]": ["cls_token"],
    "[SEP]": ["sep_token"],
    "[MASK]": ["mask_token"],
    "<mask>": ["mask_token"],
    "<unk>": ["unk_token"],
    "<s>": ["bos_token"],
    "</s>": ["eos_token"],
    "<pad>": ["pad_token"],
}


@dataclass
class TrainedTokenizer:
    spec: TokenizerSpec
    tokenizer: Tokenizer
    train_docs: int
    train_bytes: int
    train_seconds: float


def train_tokenizer(spec: TokenizerSpec, paths: list[Path], sample: Sample, show_progress: bool = False) -> TrainedTokenizer:
    """Train `spec` on the documents `sample` selects from `paths`, streaming (bounded memory)."""
    tokenizer, trainer = recipes.build(spec, show_progress)
    counter: dict[str, int] = {}
    start = time.perf_counter()
    tokenizer.train_from_iterator(iter_texts(paths, sample, counter), trainer=trainer)
    seconds = time.perf_counter() - start
    if counter.get("docs", 0) == 0:
        raise ValueError(f"tokenizer {spec.name!r}: no training documents in {len(paths)} input file(s)")
    recipes.add_post_processor(tokenizer, spec)
    return TrainedTokenizer(spec, tokenizer, counter["docs"], counter["bytes"], seconds)


def special_tokens_map(spec: TokenizerSpec) -> dict[str, str]:
    """`transformers` roles (eos_token, unk_token, ...) of the spec's special tokens."""
    roles: dict[str, str] = {}
    for token in spec.special_tokens:
        for role in SPECIAL_ROLES.get(token, []):
            roles.setdefault(role, token)
    roles["eos_token"] = spec.eos_token
    return roles


def save_tokenizer(trained: TrainedTokenizer, folder: Path) -> Path:
    """Write the tokenizer folder atomically file by file; returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    spec = trained.spec
    io.write_bytes_atomic(trained.tokenizer.to_str().encode(), folder / TOKENIZER_FILE)
    roles = special_tokens_map(spec)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000_000,
        **roles,
    }
    if spec.kind == "wordpiece":
        config["do_lower_case"] = spec.lowercase
    io.write_json_atomic(config, folder / "tokenizer_config.json")
    io.write_json_atomic(roles, folder / "special_tokens_map.json")
    io.write_json_atomic(
        {
            **spec.model_dump(),
            "train_docs": trained.train_docs,
            "train_bytes": trained.train_bytes,
            "train_seconds": round(trained.train_seconds, 3),
        },
        folder / SPEC_FILE,
    )
    return folder


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A `tokenizers.Tokenizer` from a tokenizer folder or a tokenizer.json file."""
    path = Path(path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no tokenizer.json there")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as err:  # tokenizers raises a bare Exception on a malformed file
        raise ValueError(f"{file}: not a tokenizers file ({err})") from None


def eos_token_of(path: str | Path) -> str | None:
    """The EOS token recorded beside a tokenizer (tokenizer_config.json), if any."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    config = io.read_json(folder / "tokenizer_config.json") or {}
    eos = config.get("eos_token")
    return eos.get("content") if isinstance(eos, dict) else eos


def read_spec(folder: Path) -> dict:
    return json.loads((folder / SPEC_FILE).read_text())
