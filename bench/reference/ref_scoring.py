"""The reference's scoring throughput, for `bench`: the lm-eval loglikelihood workload (prompt
logprobs of 512-token prompts, what `echo` + `logprobs` + `max_tokens: 1` asks exitserve) as a
transformers forward over the same prompts in batches of 4, through the reference
implementation (autocontrastive-gen), in the venv of bench/reference/setup_ref.sh.

Usage: python ref_scoring.py MODEL_DIR --prompts FILE.json [--batch 4] [--mode original|contrast]
FILE.json: a list of token-id lists, all of one length. Prints one JSON line.
"""
import argparse
import json
import time

import torch
from transformers import AutoConfig

from autocontrastive_gen.modeling.configuration import MultiExitConfiguration
from autocontrastive_gen.modeling.gpt2_multi_head import MultiHeadGPT2
from autocontrastive_gen.modeling.gpt_neo_multi_head import MultiHeadGPTNeo

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("--prompts", required=True)
ap.add_argument("--batch", type=int, default=4)
ap.add_argument("--mode", default="original", choices=["original", "contrast"])
args = ap.parse_args()

cfg = AutoConfig.from_pretrained(args.model)
exits = sorted(cfg.lm_head_layer_indices)
upper, lower = exits[-1], min(exits, key=lambda e: abs(e - exits[-1] / 2))
kw = {"use_original_head": True} if args.mode == "original" else \
    {"use_original_head": False, "contrast_layer_indices": (upper, lower)}
Model = MultiHeadGPT2 if cfg.model_type == "gpt2" else MultiHeadGPTNeo
model = Model.from_pretrained(args.model, **MultiExitConfiguration(**kw).get_runtime_kwargs(),
                              torch_dtype=torch.float32).eval()
prompts = torch.tensor(json.load(open(args.prompts)))


def score(batch):
    # what a loglikelihood request needs: each prompt token's logprob given the ones before it
    logits = model(batch).logits[:, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, batch[:, 1:, None]).sum()


with torch.no_grad():
    score(prompts[: args.batch])  # warm-up
    t = time.perf_counter()
    for i in range(0, len(prompts), args.batch):
        score(prompts[i:i + args.batch])
    dt = time.perf_counter() - t
mode = args.mode if args.mode == "original" else f"contrast {upper}/{lower}"
print(json.dumps({"impl": "autocontrastive-gen/transformers-" + __import__("transformers").__version__ +
                  "/torch-" + torch.__version__, "mode": mode, "batch": args.batch,
                  "prompts": len(prompts), "prompt_len": prompts.shape[1], "seconds": round(dt, 3),
                  "prompt_tok_s": round(prompts.numel() / dt, 1), "threads": torch.get_num_threads()}))
