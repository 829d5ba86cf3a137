"""HF transformers generate() baseline for a workload (meant for decode-moe-bs1):
`python -m bench.hf_baseline --workload decode-moe-bs1 [--max-new-tokens N]`.

Random bf16 weights in the workload model's shapes, on the GPU; sampling at temperature 1 with
output scores (the logprobs a rollout needs). Reports decode tokens/s of one generate call after a
short warm-up call. Run it in its own process (the model takes the GPU memory of a second copy).
"""
from __future__ import annotations

import argparse
import sys
import time

from bench.rollout import HERE, load_workloads, make_prompts
from bench.report import emit


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workload", default="decode-moe-bs1", choices=sorted(load_workloads()))
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: the workload's output_len")
    ap.add_argument("--json", default=None)
    opts = ap.parse_args(argv)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    w = load_workloads()[opts.workload]
    cfg = AutoConfig.from_pretrained(str(HERE / "models" / w["model"]))
    t0 = time.perf_counter()
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    build_s = time.perf_counter() - t0
    prompts = torch.tensor(make_prompts(w, w["seed"]), device="cuda")
    new = opts.max_new_tokens or w["output_len"]
    kw = dict(do_sample=True, temperature=w["temperature"], top_p=w["top_p"], top_k=0,
              num_return_sequences=w["n"], eos_token_id=None, pad_token_id=0, output_scores=True,
              return_dict_in_generate=True)
    with torch.inference_mode():
        model.generate(prompts, max_new_tokens=4, min_new_tokens=4, **kw)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(prompts, max_new_tokens=new, min_new_tokens=new, **kw)
        torch.cuda.synchronize()
        secs = time.perf_counter() - t0
    generated = int(out.sequences.shape[0] * (out.sequences.shape[1] - prompts.shape[1]))
    result = {"workload": opts.workload, "engine": "transformers generate", "generated_tokens": generated,
              "seconds": round(secs, 3), "tok_per_s": round(generated / secs, 1), "build_s": round(build_s, 1),
              "gpu": torch.cuda.get_device_name()}
    print(f"HF {opts.workload}: {generated} tokens in {secs:.2f} s = {generated / secs:,.1f} tok/s")
    emit(result, opts.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
