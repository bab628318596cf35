"""Regenerate the bundled fine-tuning data from the bundled sample site (deterministic, seed 0).

    python gristmill/data/finetune/make_data.py

Every page under ../sample_site is read with the standard library's HTML parser into a stream of
headings and paragraphs. Then:

- `sft.jsonl`: for each heading followed by a paragraph, a question about the heading answered by
  the paragraph's first sentence; even records use the chat format (`messages`), odd ones the
  `instruction` / `input` / `output` format, so both readers are exercised.
- `dpo.jsonl`: the same questions as preference pairs: `chosen` is the first sentence, `rejected`
  the same words in a shuffled order (fluent text against word salad).
- `classify.jsonl`: paragraphs of at least 80 characters (cut to 240) of the English pages, each
  labelled with its source (`handbook`, `python`, `postgresql`: the topic of the page) and its
  `lang`; at most 100 per source, so the majority class is a low bar. (The handbook's translations
  leave most paragraphs in English, so their language would be a noisy label.)
"""

from __future__ import annotations

import json
import random
import re
from html.parser import HTMLParser
from pathlib import Path

HERE = Path(__file__).resolve().parent
SITE = HERE.parent / "sample_site"
PER_LABEL = 100  # no source dominates the classification data
SENTENCE_END = re.compile(r"(?<=[.!?。！？])\s")


class HeadingsAndParagraphs(HTMLParser):
    """Collects ("heading" | "paragraph", text) in document order."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks: list[tuple[str, str]] = []
        self.kind: str | None = None
        self.end_tag = ""
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        # the handbook's translations write paragraphs as <div class="para">
        paragraph = tag == "p" or (tag == "div" and ("class", "para") in attrs)
        if tag in ("h1", "h2", "h3") or paragraph:
            self.kind, self.end_tag, self.text = ("paragraph" if paragraph else "heading"), tag, []

    def handle_endtag(self, tag):
        if self.kind and tag == self.end_tag:
            text = " ".join("".join(self.text).split())
            if text:
                self.blocks.append((self.kind, text))
            self.kind = None

    def handle_data(self, data):
        if self.kind:
            self.text.append(data)


def page_language(path: Path) -> str:
    parts = path.relative_to(SITE).parts
    return parts[1].split("-")[0] if parts[0] == "handbook" else "en"


def first_sentence(paragraph: str) -> str:
    """The text up to the first sentence end, or '' when there is none (sidebar labels)."""
    sentence = SENTENCE_END.split(paragraph, maxsplit=1)[0]
    return sentence if sentence[-1] in ".!?。！？" else ""


def heading_title(heading: str) -> str:
    """'9.9. Quotas' -> 'Quotas' (section numbers carry nothing a model could learn)."""
    return re.sub(r"^[A-Z]?[\d.]+\s+", "", heading).strip()


def main() -> None:
    rng = random.Random(0)
    pages = sorted(SITE.rglob("*.html"))
    blocks_of = {}
    for page in pages:
        parser = HeadingsAndParagraphs()
        parser.feed(page.read_text(errors="replace"))
        blocks_of[page] = parser.blocks
    sft, dpo, classify = [], [], []
    for page, blocks in blocks_of.items():
        language = page_language(page)
        source = page.relative_to(SITE).parts[0]
        paragraphs = [t for kind, t in blocks if kind == "paragraph" and len(t) >= 80 and language == "en"]
        for text in paragraphs:
            if sum(r["label"] == source for r in classify) < PER_LABEL:
                classify.append({"text": text[:240], "label": source, "lang": language})
        for (kind, heading), (next_kind, paragraph) in zip(blocks, blocks[1:]):
            title, answer = heading_title(heading), first_sentence(paragraph)
            if kind != "heading" or next_kind != "paragraph" or not title or not 30 <= len(answer) <= 200:
                continue
            question = f'What does the section "{title}" say?'
            if len(sft) % 2 == 0:
                sft.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
            else:
                sft.append({"instruction": "Give the first sentence of this section.", "input": title, "output": answer})
            words = answer.split()
            shuffled = words[:]
            rng.shuffle(shuffled)
            if len(words) >= 6 and shuffled != words:
                dpo.append({"prompt": question, "chosen": answer, "rejected": " ".join(shuffled)})
    for name, records in (("sft", sft), ("dpo", dpo), ("classify", classify)):
        with open(HERE / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        print(f"{name}.jsonl: {len(records)} records")


if __name__ == "__main__":
    main()
