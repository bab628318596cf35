"""The three tokenizer recipes, each an explicit list of Hugging Face `tokenizers` parts.

A recipe says which normaliser, pre-tokeniser, model, trainer, post-processor and decoder a kind of
tokenizer uses, so a reader sees the whole tokenizer in one function:

- `bpe`: byte-level BPE as GPT-2 (`pre_tokenizer: gpt2`) or Llama-3 (`pre_tokenizer: llama3`) build
  it. Every byte is in the vocabulary, so nothing is unknown and decode(encode(x)) == x when no
  normaliser changes the text.
- `wordpiece`: BERT's WordPiece, lower-cased (`lowercase: true`, accents stripped as BERT uncased
  does) or cased. Whitespace is not kept, so no round trip is promised.
- `unigram`: SentencePiece's Unigram with the Metaspace (`▁`) pre-tokeniser and NFKC by default.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

# GPT-2's pre-tokenisation regex (what `ByteLevel(use_regex=True)` applies) and Llama-3's.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

Kind = Literal["bpe", "wordpiece", "unigram"]
UnicodeForm = Literal["none", "nfc", "nfkc", "nfd", "nfkd"]

# Per kind: the special tokens, the end-of-text token, the unknown token and the normal form used
# when the workflow names none. They are the ones the reference models use (GPT-2, BERT, T5/Llama-2).
DEFAULT_SPECIAL_TOKENS: dict[str, list[str]] = {
    "bpe": ["<|endoftext|>"],
    "wordpiece": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
    "unigram": ["<unk>", "<s>", "</s>", "<pad>"],
}
DEFAULT_EOS: dict[str, str] = {"bpe": "<|endoftext|>", "wordpiece": "[SEP]", "unigram": "</s>"}
UNK_TOKEN: dict[str, str | None] = {"bpe": None, "wordpiece": "[UNK]", "unigram": "<unk>"}
DEFAULT_UNICODE_FORM: dict[str, str] = {"bpe": "none", "wordpiece": "none", "unigram": "nfkc"}
DEFAULT_MIN_FREQUENCY = 2

# Reserved in every tokenizer for the model objectives: the mask token of MLM (BERT's `[MASK]` for
# WordPiece, RoBERTa's `<mask>` otherwise) and T5's sentinels `<extra_id_0>`, `<extra_id_1>`, ...
# that stand for the dropped spans of span corruption.
MASK_TOKEN: dict[str, str] = {"bpe": "<mask>", "wordpiece": "[MASK]", "unigram": "<mask>"}
DEFAULT_SENTINELS = 32  # enough for span corruption of sequences up to ~640 tokens (0.15 noise, mean span 3)


def sentinel_token(index: int) -> str:
    return f"<extra_id_{index}>"


class TokenizerSpec(BaseModel):
    """One tokenizer to train, as written in a workflow's `tokenizers:` list."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    kind: Kind
    vocab_size: int = Field(default=8000, ge=32)
    min_frequency: int | None = Field(default=None, ge=1)
    special_tokens: list[str] | None = None
    eos_token: str | None = None
    unicode_form: UnicodeForm | None = None
    lowercase: bool = False
    pre_tokenizer: Literal["gpt2", "llama3"] = "gpt2"
    sentinels: int = Field(default=DEFAULT_SENTINELS, ge=0)  # span-corruption sentinel tokens to reserve

    @model_validator(mode="after")
    def _fill_defaults(self) -> TokenizerSpec:
        where = f"tokenizer {self.name!r}"
        if self.min_frequency is not None and self.kind == "unigram":
            raise ValueError(f"{where}: `min_frequency` does not apply to unigram training; remove it")
        if self.pre_tokenizer != "gpt2" and self.kind != "bpe":
            raise ValueError(f"{where}: `pre_tokenizer` applies to kind bpe only")
        if self.min_frequency is None and self.kind != "unigram":
            self.min_frequency = DEFAULT_MIN_FREQUENCY
        if self.special_tokens is None:
            self.special_tokens = list(DEFAULT_SPECIAL_TOKENS[self.kind])
        reserved = [MASK_TOKEN[self.kind]] + [sentinel_token(i) for i in range(self.sentinels)]
        self.special_tokens += [t for t in reserved if t not in self.special_tokens]
        if self.eos_token is None:
            self.eos_token = DEFAULT_EOS[self.kind]
        if self.eos_token not in self.special_tokens:
            raise ValueError(f"{where}: eos_token {self.eos_token!r} is not in special_tokens {self.special_tokens}")
        unk = UNK_TOKEN[self.kind]
        if unk is not None and unk not in self.special_tokens:
            raise ValueError(f"{where}: kind {self.kind} needs {unk!r} in special_tokens")
        if self.unicode_form is None:
            self.unicode_form = DEFAULT_UNICODE_FORM[self.kind]
        if self.kind == "bpe" and self.vocab_size < 256 + len(self.special_tokens):
            raise ValueError(f"{where}: byte-level BPE needs vocab_size >= 256 + special tokens")
        return self

    @property
    def round_trip_promised(self) -> bool:
        """decode(encode(x)) == x for every x: byte-level BPE that leaves the text as it is."""
        return self.kind == "bpe" and self.unicode_form == "none" and not self.lowercase


def _unicode_normalizer(form: str) -> list[normalizers.Normalizer]:
    table = {"nfc": normalizers.NFC, "nfkc": normalizers.NFKC, "nfd": normalizers.NFD, "nfkd": normalizers.NFKD}
    return [table[form]()] if form in table else []


def _sequence(parts: list[normalizers.Normalizer]) -> normalizers.Normalizer | None:
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else normalizers.Sequence(parts)


def bpe_recipe(spec: TokenizerSpec, show_progress: bool) -> tuple[Tokenizer, trainers.Trainer]:
    """Byte-level BPE: raw bytes in, so no unknown tokens; GPT-2 or Llama-3 pre-tokenisation."""
    tokenizer = Tokenizer(models.BPE())
    norm = _unicode_normalizer(spec.unicode_form) + ([normalizers.Lowercase()] if spec.lowercase else [])
    tokenizer.normalizer = _sequence(norm)
    if spec.pre_tokenizer == "gpt2":
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        min_frequency=spec.min_frequency,
        special_tokens=spec.special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    return tokenizer, trainer


def wordpiece_recipe(spec: TokenizerSpec, show_progress: bool) -> tuple[Tokenizer, trainers.Trainer]:
    """BERT WordPiece: BERT normaliser (lower-cased and accents stripped, or cased), `##` pieces,
    `[CLS] ... [SEP]` around each sequence."""
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    bert = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=spec.lowercase
    )
    tokenizer.normalizer = _sequence(_unicode_normalizer(spec.unicode_form) + [bert])
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(
        vocab_size=spec.vocab_size,
        min_frequency=spec.min_frequency,
        special_tokens=spec.special_tokens,
        continuing_subword_prefix="##",
        show_progress=show_progress,
    )
    return tokenizer, trainer


def unigram_recipe(spec: TokenizerSpec, show_progress: bool) -> tuple[Tokenizer, trainers.Trainer]:
    """SentencePiece Unigram: NFKC by default, spaces become `▁` (Metaspace), pieces up to 16 chars."""
    tokenizer = Tokenizer(models.Unigram())
    norm = _unicode_normalizer(spec.unicode_form) + ([normalizers.Lowercase()] if spec.lowercase else [])
    tokenizer.normalizer = _sequence(norm)
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=spec.special_tokens,
        unk_token="<unk>",
        max_piece_length=16,
        show_progress=show_progress,
    )
    return tokenizer, trainer


RECIPES = {"bpe": bpe_recipe, "wordpiece": wordpiece_recipe, "unigram": unigram_recipe}


def build(spec: TokenizerSpec, show_progress: bool = False) -> tuple[Tokenizer, trainers.Trainer]:
    """The untrained tokenizer and its trainer for `spec`."""
    return RECIPES[spec.kind](spec, show_progress)


def train_byte_bpe(texts: list[str], vocab_size: int) -> Tokenizer:
    """gristmill's byte-level BPE (GPT-2 pre-tokenisation, `<|endoftext|>`) trained on texts in memory,
    for callers that need a tokenizer and not the tokenizers stage's folder and report."""
    tokenizer, trainer = build(TokenizerSpec(name="bpe", kind="bpe", vocab_size=vocab_size))
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def objective_token_ids(tokenizer: Tokenizer) -> dict:
    """The mask token and sentinel ids a tokenizer reserves for the model objectives (None and []
    when it has none), as `pack` records them in meta.json."""
    mask = next((t for t in ("[MASK]", "<mask>") if tokenizer.token_to_id(t) is not None), None)
    sentinel_ids = []
    while (found := tokenizer.token_to_id(sentinel_token(len(sentinel_ids)))) is not None:
        sentinel_ids.append(found)
    return {"mask_token": mask, "mask_id": tokenizer.token_to_id(mask) if mask else None, "sentinel_ids": sentinel_ids}


def add_post_processor(tokenizer: Tokenizer, spec: TokenizerSpec) -> None:
    """WordPiece wraps sequences in `[CLS] ... [SEP]` as BERT does (needs the trained ids)."""
    if spec.kind == "wordpiece":
        cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
        if cls_id is not None and sep_id is not None:
            tokenizer.post_processor = processors.TemplateProcessing(
                single="[CLS] $A [SEP]",
                pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
            )
