"""Compare our SentencePiece ids with llama.cpp's (llama-cpp-python) on the vocabulary and texts
that probes/tests/gguf_tokenizers.rs leaves in DIR when run with MECHWATCH_SPM_KEEP=DIR.

Usage: spm_llamacpp.py DIR   (exit 1 when any text's ids differ)
"""

import json
import os
import sys

import llama_cpp


def main(work):
    ours = json.load(open(os.path.join(work, "ours.json"), encoding="utf-8"))
    llm = llama_cpp.Llama(
        model_path=os.path.join(work, "spm.gguf"), vocab_only=True, verbose=False
    )
    same = 0
    for text, mine in zip(ours["texts"], ours["ids"]):
        theirs = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        if theirs == mine:
            same += 1
        else:
            print(f"differ on {text!r}:\n  llama.cpp {theirs}\n  mechwatch {mine}")
    print(f"{same}/{len(ours['texts'])} texts identical (llama-cpp-python {llama_cpp.__version__})")
    return 0 if same == len(ours["texts"]) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
