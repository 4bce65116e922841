"""llama.cpp (through llama-cpp-python) as the independent runtime mechwatch is checked and
timed against. Reads one JSON request on stdin, writes one JSON answer on stdout.

Request: {"mode": "compare" | "bench", "model": GGUF path, "threads": N, ...}
- compare: "prompts" (token id lists), "max_tokens", "texts" (strings to tokenise). Answers,
  per prompt, the next-token logits after the prompt (written as little-endian f32 to
  "logits_out", prompt after prompt), the greedy continuation and, at each generated token, the
  gap between the two largest logits; and per text llama.cpp's ids with and without the
  model's added special tokens (special tokens parsed).
- bench: "prompts" (token id lists, each evaluated from an empty cache) and "gen_prompt",
  "gen_tokens". Answers prompt tokens per second and generation tokens per second (greedy,
  prompt prefill included, as mechwatch times it).
"""

import json
import sys
import time

import numpy as np
import llama_cpp
from llama_cpp import Llama


def last_logits(llm):
    ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).astype(np.float32).copy()


def top2_gap(row):
    top = np.partition(row, -2)[-2:]
    return float(top[1] - top[0])


def load(req, **kw):
    n = req["threads"]
    return Llama(
        model_path=req["model"],
        n_ctx=req.get("n_ctx", 2048),
        n_batch=req.get("n_batch", 2048),
        n_threads=n,
        n_threads_batch=n,
        logits_all=False,
        verbose=False,
        **kw,
    )


def compare(req):
    vocab = Llama(model_path=req["model"], vocab_only=True, verbose=False)
    tokenized = [
        {
            "plain": vocab.tokenize(t.encode("utf-8"), add_bos=False, special=True),
            "with_special": vocab.tokenize(t.encode("utf-8"), add_bos=True, special=True),
        }
        for t in req["texts"]
    ]
    del vocab
    llm = load(req)
    out = []
    with open(req["logits_out"], "wb") as f:
        for ids in req["prompts"]:
            llm.reset()
            llm.eval(ids)
            row = last_logits(llm)
            f.write(row.astype("<f4").tobytes())
            greedy, gaps = [], []
            for _ in range(req["max_tokens"]):
                tok = int(np.argmax(row))
                greedy.append(tok)
                gaps.append(top2_gap(row))
                if llm.n_tokens + 1 >= llm.n_ctx():
                    break
                llm.eval([tok])
                row = last_logits(llm)
            out.append({"greedy": greedy, "gaps": gaps})
    return {"vocab": llm.n_vocab(), "prompts": out, "tokenized": tokenized}


def bench(req):
    llm = load(req)
    prompts = req["prompts"]
    llm.reset()
    llm.eval(prompts[0])  # warm-up
    times = []
    for _ in range(req.get("reps", 3)):
        start = time.perf_counter()
        for ids in prompts:
            llm.reset()
            llm.eval(ids)
        times.append(time.perf_counter() - start)
    n_prompt = sum(len(p) for p in prompts)
    gen_prompt, gen_tokens = req["gen_prompt"], req["gen_tokens"]

    def generate():
        llm.reset()
        llm.eval(gen_prompt)
        for _ in range(gen_tokens):
            tok = int(np.argmax(last_logits(llm)))
            llm.eval([tok])

    generate()  # warm-up
    start = time.perf_counter()
    generate()
    gen_s = time.perf_counter() - start
    return {
        "prompt_tok_s": n_prompt / sorted(times)[len(times) // 2],
        "gen_tok_s": gen_tokens / gen_s,
        "system_info": llama_cpp.llama_print_system_info().decode(),
    }


def main():
    req = json.load(sys.stdin)
    answer = {"compare": compare, "bench": bench}[req["mode"]](req)
    answer["llama_cpp_python"] = llama_cpp.__version__
    json.dump(answer, sys.stdout)


if __name__ == "__main__":
    main()
