"""Reference for probes/tests/spm.rs: train a small BPE-type SentencePiece model with the
`sentencepiece` package, convert its vocabulary to GGUF tokenizer metadata as llama.cpp's
convert script does (piece text, score, and type from IsUnknown/IsControl/IsUnused/IsByte),
and record sentencepiece's own ids and decodings of the test texts.

Usage: spm_reference.py DIR   (reads DIR/train.txt and DIR/texts.json, writes DIR/reference.json)
"""

import json
import os
import sys

import sentencepiece as spm

# gguf-py's TokenType (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def main(work):
    prefix = os.path.join(work, "m")
    # Llama 2's trainer settings: byte fallback, digits split, no normalisation, whitespace
    # kept as written.
    spm.SentencePieceTrainer.train(
        input=os.path.join(work, "train.txt"),
        model_prefix=prefix,
        model_type="bpe",
        vocab_size=700,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_file=prefix + ".model")
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        ty = NORMAL
        if sp.IsUnknown(i):
            ty = UNKNOWN
        elif sp.IsControl(i):
            ty = CONTROL
        elif sp.IsUnused(i):
            ty = UNUSED
        elif sp.IsByte(i):
            ty = BYTE
        tokens.append(sp.IdToPiece(i))
        scores.append(sp.GetScore(i))
        types.append(ty)
    with open(os.path.join(work, "texts.json"), encoding="utf-8") as f:
        texts = json.load(f)
    ids = [sp.encode(t) for t in texts]
    json.dump(
        {
            "tokens": tokens,
            "scores": scores,
            "types": types,
            "bos": sp.bos_id(),
            "eos": sp.eos_id(),
            "unk": sp.unk_id(),
            "add_space_prefix": True,
            "ids": ids,
            "decoded": [sp.decode(i) for i in ids],
        },
        open(os.path.join(work, "reference.json"), "w", encoding="utf-8"),
    )


if __name__ == "__main__":
    main(sys.argv[1])
