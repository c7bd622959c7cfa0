#!/usr/bin/env python3
"""Builds data/cloze/wikitext2-test-cloze.jsonl: LAMBADA-format cloze lines ({"text": ...}, the target is the
final whitespace-separated word) from WikiText-2 raw test paragraphs, whose sentences end with " . ". A
sentence qualifies when it has 12-60 words, no "@" joiners, and its last word is purely alphabetic and at least
3 letters; the " ." is dropped.
The first 500 qualifying sentences, in file order. Deterministic; run from the repository root."""
import json, re

out = []
for line in open("data/wikitext-2/wiki.test.raw", encoding="utf-8"):
    line = line.strip()
    if not line or line.startswith("="):
        continue
    for sent in re.split(r"(?<= \.) ", line):
        if not sent.endswith(" ."):
            continue
        words = sent[:-2].split()
        if 12 <= len(words) <= 60 and "@" not in sent and words[-1].isalpha() and len(words[-1]) >= 3:
            out.append({"text": " ".join(words)})
    if len(out) >= 500:
        break
with open("data/cloze/wikitext2-test-cloze.jsonl", "w", encoding="utf-8") as f:
    for o in out[:500]:
        f.write(json.dumps(o, ensure_ascii=False) + "\n")
print(len(out[:500]))
