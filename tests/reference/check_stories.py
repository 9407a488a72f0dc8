#!/usr/bin/python3
"""Validates the reference oracle on a real trained model: greedy decoding of stories260K from
BOS must reproduce llama2.c's reference text (text 1 of stories260k/SOURCE.md).

Usage: check_stories.py [MODELS_DIR]   (default: $BACKPROMPT_TEST_DATA or <repo>/../shared/models)
Exit status: 0 match, 1 mismatch, 77 test data absent.
"""

import os
import re
import sys

sys.dont_write_bytecode = True  # keep the source tree clean of __pycache__
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference  # noqa: E402

BOS = 1
N_STEPS = 200


def models_dir(argv):
    if len(argv) > 1:
        return argv[1]
    if os.environ.get("BACKPROMPT_TEST_DATA"):
        return os.environ["BACKPROMPT_TEST_DATA"]
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.path.join(repo, "..", "shared", "models")


def expected_text(source_md):
    """The first fenced block after the '1. Greedy' line."""
    with open(source_md, encoding="utf-8") as f:
        text = f.read()
    m = re.search(r"^1\. Greedy.*?\n```\n(.*?)\n```", text, re.S | re.M)
    if not m:
        raise SystemExit(f"{source_md}: reference text 1 not found")
    return m.group(1)


def decode(pieces, ids):
    out = []
    for i, t in enumerate(ids):
        p = pieces[t]
        m = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", p)
        if m:
            p = chr(int(m.group(1), 16))
        p = p.replace("\u2581", " ")
        if i == 0 and p.startswith(" "):
            p = p[1:]
        out.append(p)
    return "".join(out)


def main(argv):
    d = os.path.join(models_dir(argv), "stories260k")
    gguf = os.path.join(d, "stories260K.gguf")
    if not os.path.exists(gguf):
        print(f"skipped: {gguf} not found")
        return 77
    model = reference.Model(gguf)
    pieces = model.file.get("tokenizer.ggml.tokens")
    ids = reference.greedy(model, [BOS], N_STEPS)
    got = decode(pieces, ids)
    want = expected_text(os.path.join(d, "SOURCE.md"))
    if got == want:
        print(f"OK: {len(ids)} greedy tokens reproduce reference text 1 exactly")
        return 0
    common = 0
    while common < min(len(got), len(want)) and got[common] == want[common]:
        common += 1
    print(f"MISMATCH after {common} characters")
    print("--- got ---\n" + got + "\n--- want ---\n" + want)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
