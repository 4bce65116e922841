"""PyTorch + transformers on a GPU, timing the work `mechwatch bench forward --device cuda`
times, on the same HF directory and token ids: hooked prompt processing (the residual stream
captured after block `hook_layer`, logits at each prompt's last position, micro-batches of
`micro_batch` prompts), greedy generation of one prompt with a steering vector added after
that block, and greedy generation of 32 prompts at once. f32 weights, TF32 off, as
mechwatch's CUDA path. Reads one JSON request on stdin, writes one JSON answer on stdout.

Request: {"model": HF directory, "device": "cuda" (the default) or "cpu", "prompts": token id lists, "gen_prompt": ids,
"gen_tokens": N, "micro_batch": N, "hook_layer": N, "reps": N}.
"""

import json
import sys
import time

import torch
import transformers
from transformers import AutoModelForCausalLM


def main():
    req = json.load(sys.stdin)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device(req.get("device", "cuda"))

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    model = AutoModelForCausalLM.from_pretrained(req["model"], dtype=torch.float32).to(dev)
    model.eval()
    layer = model.model.layers[req["hook_layer"]]
    d = model.config.hidden_size
    steer = {"on": False}
    captured = []
    vec = torch.ones(d, device=dev) / d**0.5 * 4.0

    def hook(_module, _inputs, out):
        h = out[0] if isinstance(out, tuple) else out
        if steer["on"]:
            h = h + vec
            return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h
        captured.append(h.detach())
        return None

    layer.register_forward_hook(hook)
    prompts = torch.tensor(req["prompts"], device=dev)
    mb = req["micro_batch"]

    def prompt_pass():
        for i in range(0, len(prompts), mb):
            captured.clear()
            h = model.model(prompts[i:i + mb]).last_hidden_state
            model.lm_head(h[:, -1])
        sync()

    def timed(f):
        t = time.perf_counter()
        f()
        return time.perf_counter() - t

    with torch.no_grad():
        prompt_pass()
        t = sorted(timed(prompt_pass) for _ in range(max(1, req["reps"])))[req["reps"] // 2]
        n_tokens = prompts.numel()

        def gen(ids, n):
            # Plain greedy decoding, whatever the checkpoint's generation_config.json says.
            out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 repetition_penalty=1.0, attention_mask=torch.ones_like(ids))
            sync()
            return (out.shape[1] - ids.shape[1]) * ids.shape[0]

        one = torch.tensor([req["gen_prompt"]], device=dev)
        steer["on"] = True
        gen(one, 8)
        t0 = time.perf_counter()
        n = gen(one, req["gen_tokens"])
        g = time.perf_counter() - t0
        steer["on"] = False
        rows = prompts[:32]
        t0 = time.perf_counter()
        nb = gen(rows, 32)
        b = time.perf_counter() - t0
    json.dump({
        "torch": torch.__version__, "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu",
        "prompt_tok_s": n_tokens / t, "gen_tok_s": n / g, "batched_gen_tok_s": nb / b,
    }, sys.stdout)


if __name__ == "__main__":
    main()
