"""An independent f32 reference: Hugging Face transformers (PyTorch) reading the same GGUF
file, dequantizing it with the `gguf` package and running the model in f32. Reads one JSON
request on stdin, writes one JSON answer on stdout.

Request: {"model": GGUF path, "prompts": token id lists, "max_tokens": N,
"logits_out": path, "threads": N}. Answers, per prompt, the next-token logits after the
prompt (little-endian f32 written to "logits_out", prompt after prompt), the greedy
continuation of "max_tokens" tokens and, at each generated token, the gap between the two
largest logits.
"""

import json
import os
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM


def main():
    req = json.load(sys.stdin)
    torch.set_num_threads(req.get("threads", 1))
    path = req["model"]
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    )
    model.eval()
    out = []
    with open(req["logits_out"], "wb") as f, torch.no_grad():
        for ids in req["prompts"]:
            result = model(torch.tensor([ids]), use_cache=True)
            row = result.logits[0, -1].float()
            f.write(row.numpy().astype("<f4").tobytes())
            past = result.past_key_values
            greedy, gaps = [], []
            for _ in range(req["max_tokens"]):
                top = torch.topk(row, 2)
                tok = int(top.indices[0])
                greedy.append(tok)
                gaps.append(float(top.values[0] - top.values[1]))
                result = model(torch.tensor([[tok]]), past_key_values=past, use_cache=True)
                row, past = result.logits[0, -1].float(), result.past_key_values
            out.append({"greedy": greedy, "gaps": gaps})
    json.dump(
        {
            "vocab": int(row.shape[0]),
            "prompts": out,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
        sys.stdout,
    )


if __name__ == "__main__":
    main()
