"""Issue 13: the rollout job never writes over a file it did not create, and reads no more of the
prompt file than data.limit (and the results file it resumes) need."""
from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest

from atom.rollout.job import JobError, run
from atom.rollout.job_prompts import load_prompts
from atom.rollout.job_config import DataConfig
from test_rollout_job import compose_job, job_overrides, read_results


@pytest.fixture(scope="module")
def model_path(make_tiny_model) -> str:
    return make_tiny_model("llama")


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt_token_ids": [2 + i, 3, 4]}) + "\n" for i in range(3)))
    return path


def _refused(model_path, prompts_file, out: Path, match: str, *extra: str) -> None:
    files = {p: p.read_bytes() for p in {out, prompts_file} if p.exists()}
    for resume in ("true", "false"):
        with pytest.raises(JobError, match=match):
            run(compose_job(*job_overrides(model_path, prompts_file, out, f"output.resume={resume}", *extra)))
        assert {p: p.read_bytes() for p in files} == files  # not a byte changed


def test_output_path_equal_to_the_prompt_file_is_refused(model_path, prompts_file, tmp_path):
    _refused(model_path, prompts_file, prompts_file, "is the prompt file")
    link = tmp_path / "link.jsonl"
    link.symlink_to(prompts_file)
    _refused(model_path, prompts_file, link, "is the prompt file")


@pytest.mark.parametrize("content", [
    "my notes\nsecond line\n",
    '{"index": 0, "prompt_hash": "x"}\nplain text, not a result\n',
    json.dumps({"prompt_token_ids": [9, 9]}) + "\n",
    "\n\n  some text",
    "{\"index\": 3",  # looks like a torn result line, but then it would need the job's other lines
])
def test_any_other_file_is_refused(model_path, prompts_file, tmp_path, content):
    out = tmp_path / "existing.txt"
    out.write_text(content)
    match = "not a rollout result line|another model or sampling settings"
    if content.startswith("{\"index\": 3"):
        # A lone torn line is what a crash in the job's first write leaves: that is ours to repair.
        summary = run(compose_job(*job_overrides(model_path, prompts_file, out)))
        assert summary.generated_prompts == 3 and len(read_results(out)) == 3
        return
    _refused(model_path, prompts_file, out, match)


def test_a_large_foreign_file_is_refused_unread(model_path, prompts_file, tmp_path):
    out = tmp_path / "big.bin"
    out.write_bytes(b"\x00" * (8 << 20))  # no newline anywhere: reading it by lines would load it whole
    tracemalloc.start()
    try:
        with pytest.raises(JobError, match="not a rollout result line"):
            run(compose_job(*job_overrides(model_path, prompts_file, out)))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < (4 << 20)
    assert out.read_bytes() == b"\x00" * (8 << 20)


def test_empty_file_and_own_results_are_written(model_path, prompts_file, tmp_path):
    out = tmp_path / "empty.jsonl"
    out.write_text("")
    run(compose_job(*job_overrides(model_path, prompts_file, out)))
    first = read_results(out)
    assert [r["index"] for r in first] == [0, 1, 2]
    # Its own results, same settings, started anew: allowed, and the same samples (per-prompt seeds).
    run(compose_job(*job_overrides(model_path, prompts_file, out, "output.resume=false")))
    assert [r["completions"][0]["token_ids"] for r in read_results(out)] == \
        [r["completions"][0]["token_ids"] for r in first]


def test_n_above_the_engines_max_num_seqs_fails_before_anything(model_path, prompts_file, tmp_path):
    out = tmp_path / "out.jsonl"
    with pytest.raises(JobError, match=r"sampling: SamplingParams.n=64 is invalid: must be at most the engine's "
                                       r"max_num_seqs=32"):
        run(compose_job(*job_overrides(model_path, prompts_file, out, "sampling.n=64")))
    assert not out.exists()


def _big_prompt_file(path: Path, good: int, total: int) -> Path:
    """`good` valid prompts, then rows up to `total` that are not JSON at all."""
    with open(path, "w") as f:
        for i in range(good):
            f.write(json.dumps({"prompt_token_ids": [2 + i % 50, 3, 4]}) + "\n")
        f.write("not json\n" * (total - good))
    return path


def test_data_limit_reads_only_the_prompts_it_uses(model_path, tmp_path):
    data = _big_prompt_file(tmp_path / "big.jsonl", good=4, total=200_000)
    out = tmp_path / "out.jsonl"
    summary = run(compose_job(*job_overrides(model_path, data, out, "data.limit=2")))
    assert summary.prompts == 2 and [r["index"] for r in read_results(out)] == [0, 1]
    # A longer limit resumes, checking the lines already written against the file.
    summary = run(compose_job(*job_overrides(model_path, data, out, "data.limit=4")))
    assert (summary.skipped, summary.generated_prompts) == (2, 2)
    # Without a limit the whole file is read, and its first bad row named.
    with pytest.raises(JobError, match=r"big.jsonl:5: not valid JSON"):
        run(compose_job(*job_overrides(model_path, data, tmp_path / "all.jsonl")))


def test_load_prompts_memory_is_bounded_by_the_limit(tmp_path):
    data = _big_prompt_file(tmp_path / "big.jsonl", good=20_000, total=20_000)
    config = DataConfig(path=str(data))
    tracemalloc.start()
    try:
        prompts = load_prompts(config, 2)
        limited = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        everything = load_prompts(config)
        whole = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    print(f"peak memory: limit=2 {limited} B, whole file {whole} B")
    assert [p.prompt for p in prompts] == [[2, 3, 4], [3, 3, 4]] and len(everything) == 20_000
    assert limited < (256 << 10) < (4 << 20) < whole


def test_parquet_limit_reads_only_the_first_batches(model_path, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    ids = [[5, 6, 7]] * 3 + [[-1]] * 5000  # rows past the limit are invalid prompts: never validated
    pq.write_table(pa.table({"prompt_token_ids": ids}), path, row_group_size=1000)
    assert [p.prompt for p in load_prompts(DataConfig(path=str(path)), 3)] == [[5, 6, 7]] * 3
    with pytest.raises(JobError, match=r"row 3: 'prompt_token_ids' must be"):
        load_prompts(DataConfig(path=str(path)))
