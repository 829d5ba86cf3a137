"""The Hydra rollout job (`python -m atom.rollout`), end to end on CPU with a tiny random model.

Most tests compose the config with Hydra's compose API and call `atom.rollout.job.run` in-process;
two run the real CLI in a subprocess (a --multirun sweep, and a bad input's one-line error).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException

import atom.rollout.job_config  # noqa: F401  (registers the schema)
from atom.rollout.job import JobError, run

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = str(REPO / "configs")
N_PROMPTS = 5
# Small and fast: a fixed KV pool, no CUDA anything, no progress bar.
COMMON = ["engine=cpu", "engine.num_kv_blocks=64", "engine.max_num_seqs=32", "output.progress=false",
          "sampling.max_tokens=6", "sampling.ignore_eos=true"]


def compose_job(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("rollout", overrides=list(overrides))


@pytest.fixture(scope="module")
def model_path(make_tiny_model) -> str:
    return make_tiny_model("llama")


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    rows = [{"prompt_token_ids": [2 + i, 3 + i, 4 + i, 5], "id": f"q{i}"} for i in range(N_PROMPTS)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def job_overrides(model_path, prompts_file, out, *extra):
    return ["model=tiny_llama", f"model.path={model_path}", f"data.path={prompts_file}", f"output.path={out}",
            *COMMON, *extra]


def read_results(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_same_samples(a: list[dict], b: list[dict]) -> None:
    """Same prompts and sampled tokens; logprobs equal up to float noise (batch composition differs)."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert {k: v for k, v in x.items() if k != "completions"} == {k: v for k, v in y.items() if k != "completions"}
        assert len(x["completions"]) == len(y["completions"])
        for c, d in zip(x["completions"], y["completions"]):
            assert {k: v for k, v in c.items() if k != "logprobs"} == {k: v for k, v in d.items() if k != "logprobs"}
            assert c["logprobs"] == pytest.approx(d["logprobs"], abs=1e-4)


def test_job_end_to_end(model_path, prompts_file, tmp_path):
    out = tmp_path / "out" / "results.jsonl"
    summary = run(compose_job(*job_overrides(model_path, prompts_file, out, "sampling.n=3", "data.batch_size=2")))
    rows = read_results(out)
    assert [r["index"] for r in rows] == list(range(N_PROMPTS))
    for i, r in enumerate(rows):
        assert r["prompt"] == [2 + i, 3 + i, 4 + i, 5] == r["prompt_token_ids"]
        assert len(r["completions"]) == 3
        for k, c in enumerate(r["completions"]):
            assert c["index"] == k
            assert len(c["token_ids"]) == 6  # ignore_eos: exactly max_tokens
            assert len(c["logprobs"]) == len(c["token_ids"])
            assert all(lp <= 0.0 for lp in c["logprobs"])
            assert c["finish_reason"] == "length"
            assert c["weight_version"] == 0
    assert summary.prompts == summary.generated_prompts == N_PROMPTS and summary.skipped == 0
    assert summary.completions == 3 * N_PROMPTS
    assert summary.generated_tokens == 6 * 3 * N_PROMPTS
    assert summary.tokens_per_s > 0 and summary.preemptions >= 0
    assert 0.0 <= summary.prefix_cache_hit_rate <= 1.0

    # Per-prompt seeds: the same job (another output file, other chunking) gives the same samples.
    again = tmp_path / "again.jsonl"
    run(compose_job(*job_overrides(model_path, prompts_file, again, "sampling.n=3", "data.batch_size=5")))
    assert_same_samples(read_results(again), rows)


def test_overrides_change_the_result(model_path, prompts_file, tmp_path):
    out = tmp_path / "greedy.jsonl"
    run(compose_job(*job_overrides(model_path, prompts_file, out, "sampling=greedy", "sampling.n=2",
                                   "sampling.max_tokens=4", "sampling.logprobs=2")))
    for r in read_results(out):
        a, b = r["completions"]
        assert len(a["token_ids"]) == 4
        assert a["token_ids"] == b["token_ids"]  # greedy: n identical completions
        assert len(a["top_logprobs"]) == 4 and all(len(t) >= 2 for t in a["top_logprobs"])
        # greedy picks the most likely token: its logprob is the top alternative's
        for tok, lp, top in zip(a["token_ids"], a["logprobs"], a["top_logprobs"]):
            assert str(tok) in top


def test_parquet_input_and_limit(model_path, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"ids": [[5, 6, 7], [8, 9], [10, 11, 12, 13]]}), path)
    out = tmp_path / "out.jsonl"
    summary = run(compose_job(*job_overrides(model_path, path, out, "data.prompt_key=ids", "data.limit=2")))
    rows = read_results(out)
    assert [r["prompt"] for r in rows] == [[5, 6, 7], [8, 9]]
    assert summary.prompts == 2


def test_resume_skips_done_prompts_and_repairs_a_torn_line(model_path, prompts_file, tmp_path):
    full = tmp_path / "full.jsonl"
    run(compose_job(*job_overrides(model_path, prompts_file, full, "sampling.n=2")))
    expected = read_results(full)

    # A job that stopped after 2 prompts, with a crash in the middle of writing the third line.
    out = tmp_path / "out.jsonl"
    first = run(compose_job(*job_overrides(model_path, prompts_file, out, "sampling.n=2", "data.limit=2")))
    assert first.generated_prompts == 2
    with open(out, "a") as f:
        f.write(json.dumps(expected[2])[:40])
    summary = run(compose_job(*job_overrides(model_path, prompts_file, out, "sampling.n=2", "data.batch_size=2")))
    assert (summary.skipped, summary.generated_prompts) == (2, N_PROMPTS - 2)
    assert_same_samples(read_results(out), expected)  # as one uninterrupted run, every line intact

    # Everything done: nothing to generate (the engine is not even built).
    done = run(compose_job(*job_overrides(model_path, prompts_file, out, "sampling.n=2")))
    assert (done.skipped, done.generated_prompts) == (N_PROMPTS, 0)
    assert_same_samples(read_results(out), expected)

    # The results file belongs to another job (sampling settings or prompt file): refuse to mix them.
    with pytest.raises(JobError, match="another model or sampling settings"):
        run(compose_job(*job_overrides(model_path, prompts_file, out, "sampling.n=3")))
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"prompt_token_ids": [9, 9]}) + "\n")
    with pytest.raises(JobError, match="does not match the prompt file"):
        run(compose_job(*job_overrides(model_path, other, out, "sampling.n=2")))
    # Starting anew (output.resume=false) replaces results of the same settings only, never others.
    before = out.read_bytes()
    with pytest.raises(JobError, match="another model or sampling settings"):
        run(compose_job(*job_overrides(model_path, other, out, "output.resume=false")))
    assert out.read_bytes() == before
    run(compose_job(*job_overrides(model_path, other, out, "sampling.n=2", "output.resume=false")))
    assert len(read_results(out)) == 1


@pytest.mark.parametrize("name, content, overrides, message", [
    ("missing", None, [], r"missing\.jsonl': no such file"),
    ("empty", "", [], "no prompts"),
    ("notjson", '{"prompt_token_ids": [3, 4]}\n{"prompt_token_ids": [3\n', [], r"notjson\.jsonl:2: not valid JSON"),
    ("nokey", '{"prompt_token_ids": [3, 4]}\n\n{"text": "hi"}\n', [], r"nokey\.jsonl:3: no prompt"),
    ("badids", '{"prompt_token_ids": [3, -4]}\n', [], r"badids\.jsonl:1: 'prompt_token_ids' must be"),
    ("vocab", '{"prompt_token_ids": [3, 100000]}\n', [], r"vocab\.jsonl:1: token id 100000 is outside"),
    ("text", '{"prompt": "hello"}\n', [], r"text\.jsonl:1: text prompts need a tokenizer; pass token ids instead"),
    ("nomodel", '{"prompt_token_ids": [3]}\n', ["model.path=/no/such/model"], "no such checkpoint directory"),
    ("nopath", '{"prompt_token_ids": [3]}\n', ["model=qwen3_8b", "model.path=null"], "'qwen3_8b' has no checkpoint"),
    ("sampling", '{"prompt_token_ids": [3]}\n', ["sampling.top_p=2"], r"sampling: SamplingParams\.top_p"),
])
def test_bad_input_fails_cleanly(model_path, tmp_path, name, content, overrides, message):
    data = tmp_path / f"{name}.jsonl"
    if content is not None:
        data.write_text(content)
    out = tmp_path / "out.jsonl"
    with pytest.raises(JobError, match=message):
        run(compose_job(*job_overrides(model_path, data, out, *overrides)))
    assert not out.exists()  # nothing half-written


def test_default_job_on_the_embedded_model(smollm2_path, tmp_path):
    """The README's main job (default model, packaged chat prompts), cut short: 2 prompts, 3 tokens."""
    out = tmp_path / "default.jsonl"
    summary = run(compose_job("engine=cpu", "engine.num_kv_blocks=32", "data.limit=2", "sampling.max_tokens=3",
                              f"output.path={out}", "output.progress=false"))
    rows = read_results(out)
    assert len(rows) == summary.prompts == 2
    assert rows[0]["prompt"] == [{"role": "user", "content": "What is the capital of France?"}]
    for r in rows:
        (c,) = r["completions"]
        assert 1 <= len(c["token_ids"]) <= 3 and len(c["logprobs"]) == len(c["token_ids"])
        assert c["text"] or c["finish_reason"] == "stop"


def test_schema_catches_typos_and_wrong_types_and_unknown_models():
    with pytest.raises(ConfigCompositionException, match="temprature"):
        compose_job("sampling.temprature=0.7")
    with pytest.raises(ConfigCompositionException, match="sampling.n=eight"):
        compose_job("sampling.n=eight")
    with pytest.raises(MissingConfigException, match="model/gpt5"):
        compose_job("model=gpt5")
    cfg = compose_job()  # the README's main job: embedded default model and prompt set
    assert cfg.model.name == "smollm2_135m" and cfg.model.path is None and cfg.data.path is None
    assert compose_job("sampling=grpo").sampling.n == 8


def test_job_schema_mirrors_the_engine_api():
    """The job's sampling/engine sections stay in step with SamplingParams and EngineConfig."""
    import dataclasses

    from atom.config import EngineConfig
    from atom.rollout.job_config import EngineJobConfig, SamplingConfig
    from atom.sampling_params import SamplingParams

    names = lambda cls: {f.name for f in dataclasses.fields(cls)}  # noqa: E731
    assert names(SamplingConfig) == names(SamplingParams)
    assert names(EngineJobConfig) == names(EngineConfig) - {"model", "tokenizer"}  # sleep-mode fields too
    engine_defaults = {f.name: f.default for f in dataclasses.fields(EngineConfig)}
    for f in dataclasses.fields(EngineJobConfig):
        if f.default is not dataclasses.MISSING:
            assert f.default == engine_defaults[f.name], f.name
    # Overrides of every derived field are type-checked by Hydra at composition.
    assert compose_job("engine.lazy_kv_wake=false").engine.lazy_kv_wake is False
    with pytest.raises(Exception, match="enable_sleep_mode"):
        compose_job("engine.enable_sleep_mode=maybe")


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "atom.rollout", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_multirun_over_temperatures(model_path, prompts_file, tmp_path):
    sweep = tmp_path / "sweep"
    proc = _cli("--multirun", "model=tiny_llama", f"model.path={model_path}", f"data.path={prompts_file}",
                *COMMON, "sampling.temperature=0.5,1.5", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {}
    for job_dir in (sweep / "0", sweep / "1"):
        overrides = (job_dir / ".hydra" / "overrides.yaml").read_text()
        temperature = "0.5" if "sampling.temperature=0.5" in overrides else "1.5"
        rows = read_results(job_dir / "rollouts.jsonl")  # in Hydra's job directory
        assert len(rows) == N_PROMPTS
        results[temperature] = rows
        assert "rollout done: 5 prompts" in (job_dir / "rollout.log").read_text()
    assert set(results) == {"0.5", "1.5"}
    assert results["0.5"] != results["1.5"]


def test_cli_bad_input_is_one_error_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"messages": "not a list"}\n')
    out = tmp_path / "out.jsonl"
    proc = _cli(f"data.path={bad}", f"output.path={out}", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "bad.jsonl:2:" in lines[0], proc.stderr
    assert not out.exists()
