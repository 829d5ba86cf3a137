"""GPT-OSS fp32: an engine on CUDA against the same engine on the CPU (parameters, then logprobs)."""
import sys
import tempfile

sys.path.insert(0, "tests")
from conftest import TINY_VOCAB, build_tiny_model  # noqa: E402
from helpers import random_prompts  # noqa: E402

from atom import RolloutEngine, SamplingParams  # noqa: E402

path = tempfile.mkdtemp()
build_tiny_model("gpt_oss").save_pretrained(path)
kw = dict(dtype="float32", kv_cache_memory_bytes=64 << 20, max_num_batched_tokens=32)
prompts = random_prompts([5, 16, 37], TINY_VOCAB, seed=1)
sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=0, prompt_logprobs=0, logprobs_mode="raw")
cpu = RolloutEngine(path, device="cpu", **kw)  # the op table is per process: CPU first, then CUDA
cpu_outs = cpu.generate(prompts, sp)
pc = {n: p.detach().clone() for n, p in cpu._engine.runner.model.named_parameters()}
cb_all = {n: b.detach().clone() for n, b in cpu._engine.runner.model.named_buffers()}
gpu = RolloutEngine(path, device="cuda", **kw)
for n, p in gpu._engine.runner.model.named_parameters():
    d = (p.detach().cpu() - pc[n]).abs().max().item()
    if d > 0:
        print("param differs:", n, d)
for n, b in gpu._engine.runner.model.named_buffers():
    cb = cb_all[n]
    d = (b.detach().cpu().float() - cb.float()).abs().max().item()
    if d > 1e-5:
        print("buffer differs:", n, d)
for p, a, b in zip(prompts, cpu_outs, gpu.generate(prompts, sp)):
    pa = [list(e.values())[0] for e in a.prompt_logprobs[1:]]
    pb = [list(e.values())[0] for e in b.prompt_logprobs[1:]]
    worst = max(abs(x - y) for x, y in zip(pa, pb))
    first_bad = next((i for i, (x, y) in enumerate(zip(pa, pb)) if abs(x - y) > 1e-3), None)
    print(len(p), "prompt logprob max diff", round(worst, 4), "first position off:", first_bad,
          "tokens", a.outputs[0].token_ids, b.outputs[0].token_ids)
