"""The rollout job under adversarial input: bad prompt files, output paths it must not touch, crashes,
torn lines, a second job on the same output, bad overrides. Everything in-process, on the tiny llama.

A job's result is compared with an uninterrupted run of the same job (the README's promise: a resumed
job gives the same samples); every refusal checks that no byte of any file changed.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from atom.rollout import ray_job
from atom.rollout.job import JobError, run
from atom.rollout.job_lock import LOCK_MARK, lock_path
from test_rollout_job import assert_same_samples, compose_job, job_overrides, read_results

N = 5
IDS = [[10 + i, 20 + i, 30] for i in range(N)]


@pytest.fixture(scope="module")
def model_path(make_tiny_model) -> str:
    return make_tiny_model("llama")


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt_token_ids": ids}) + "\n" for ids in IDS))
    return path


@pytest.fixture(scope="module")
def reference(model_path, prompts_file, tmp_path_factory) -> bytes:
    """The results file of one uninterrupted run (batch_size=2: three chunks)."""
    out = tmp_path_factory.mktemp("ref") / "ref.jsonl"
    run(compose_job(*job_overrides(model_path, prompts_file, out, "data.batch_size=2")))
    data = out.read_bytes()
    assert [r["prompt"] for r in read_results(out)] == IDS
    return data


def _job(model_path, prompts_file, out, *extra):
    return compose_job(*job_overrides(model_path, prompts_file, out, "data.batch_size=2", *extra))


def _rows(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.decode().splitlines()]


@pytest.fixture
def no_engine(monkeypatch):
    """Fail the test if the job builds an engine: refusals must come before that."""
    def boom(*a, **k):
        raise AssertionError("the engine was built")
    monkeypatch.setattr(ray_job, "make_engine", boom)


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() and not p.is_symlink() else None)
            for p in sorted(folder.rglob("*"))}


# ---------------------------------------------------------------------------------------------
# the prompt file


@pytest.mark.parametrize("name, content, message", [
    ("missing", None, r"missing\.jsonl': no such file"),
    ("empty", b"", r"empty\.jsonl': no prompts"),
    ("blank", b"\n   \n\n", r"blank\.jsonl': no prompts"),
    ("badjson", b'{"prompt_token_ids": [3]}\n{"prompt_token_ids": [4]}\n{"prompt_token_ids": [5,\n',
     r"badjson\.jsonl:3: not valid JSON"),
    ("binary", b'{"prompt_token_ids": [3]}\n{"prompt": "\xff\xfe caf\xe9"}\n', r"binary\.jsonl:2: not UTF-8 text"),
    ("array", b'[1, 2, 3]\n', r"array\.jsonl:1: expected a JSON object, got list"),
    ("typo", b'{"prompt_token_ids": [3]}\n{"promt": "hi", "id": 7}\n', r"typo\.jsonl:2: no prompt: none of the keys"),
    ("int", b'{"prompt": 5}\n', r"int\.jsonl:1: 'prompt' must be a non-empty string or a list of token ids"),
    ("bool", b'{"prompt_token_ids": [true, 2]}\n', r"bool\.jsonl:1: 'prompt_token_ids' must be a non-empty list"),
    ("float", b'{"prompt_token_ids": [2.5]}\n', r"float\.jsonl:1: 'prompt_token_ids' must be a non-empty list"),
    ("string", b'{"prompt_token_ids": "1 2 3"}\n', r"string\.jsonl:1: 'prompt_token_ids' must be"),
    ("emptyids", b'{"prompt_token_ids": []}\n', r"emptyids\.jsonl:1: 'prompt_token_ids' must be"),
    ("content", b'{"messages": [{"role": "user", "content": 5}]}\n', r"content\.jsonl:1: 'messages' must be"),
    ("msgstr", b'{"messages": "hello"}\n', r"msgstr\.jsonl:1: 'messages' must be"),
])
def test_bad_prompt_file_is_named_and_nothing_is_created(model_path, tmp_path, no_engine, name, content, message):
    data = tmp_path / f"{name}.jsonl"
    if content is not None:
        data.write_bytes(content)
    out = tmp_path / "new" / "deeper" / "out.jsonl"  # folders the job would create: none may be left
    before = _snapshot(tmp_path)
    with pytest.raises(JobError, match=message):
        run(compose_job(*job_overrides(model_path, data, out)))
    assert _snapshot(tmp_path) == before


def test_prompt_file_that_is_a_folder(model_path, tmp_path, no_engine):
    with pytest.raises(JobError, match="not a file"):
        run(compose_job(*job_overrides(model_path, tmp_path, tmp_path / "out.jsonl")))
    assert not (tmp_path / "out.jsonl").exists()


def test_extra_row_keys_are_ignored_and_a_bom_is_not_part_of_the_prompt(model_path, prompts_file, reference,
                                                                     tmp_path):
    data = tmp_path / "extra.jsonl"
    rows = [{"id": f"q{i}", "prompt_token_ids": ids, "meta": {"source": "x", "n": [1]}} for i, ids in enumerate(IDS)]
    data.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in rows).encode())
    out = tmp_path / "out.jsonl"
    summary = run(_job(model_path, data, out))
    assert summary.generated_prompts == N
    got = read_results(out)
    assert [r["prompt"] for r in got] == IDS  # same prompts, same hashes, same samples as the reference
    assert_same_samples(got, _rows(reference))


# ---------------------------------------------------------------------------------------------
# the output path: never a user's file or folder


def test_output_path_refusals_touch_nothing(model_path, prompts_file, tmp_path, no_engine):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me\n")
    user_file = tmp_path / "data.jsonl"  # the user's own JSONL that happens to look like results
    user_file.write_text('{"index": 0, "prompt_hash": "0123456789abcdef", "label": 1}\n')
    dangling = tmp_path / "link.jsonl"
    dangling.symlink_to(tmp_path / "gone" / "x.jsonl")
    under_a_file = folder / "notes.txt" / "out.jsonl"
    cases = [(folder, r"not a file \(a folder: name a file inside it"),
             (user_file, "another model or sampling settings"),
             (dangling, "symbolic link to nothing"),
             (under_a_file, "cannot create its folder")]
    before = _snapshot(tmp_path)
    for out, message in cases:
        for resume in ("true", "false"):
            with pytest.raises(JobError, match=message):
                run(compose_job(*job_overrides(model_path, prompts_file, out, f"output.resume={resume}")))
            assert _snapshot(tmp_path) == before, out


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes read-only files anyway")
def test_read_only_results_file_is_refused_before_the_engine(model_path, prompts_file, reference, tmp_path,
                                                           no_engine):
    out = tmp_path / "ro.jsonl"
    out.write_bytes(reference.split(b"\n", 1)[0] + b"\n")
    out.chmod(0o444)
    with pytest.raises(JobError, match="not writable"):
        run(_job(model_path, prompts_file, out))


# ---------------------------------------------------------------------------------------------
# resuming


@pytest.mark.parametrize("cut", [1, 5, 10, 60, -1])
def test_resume_after_a_crash_anywhere_in_a_line(model_path, prompts_file, reference, tmp_path, cut):
    """A crash mid-write tears the last line at any byte, even inside its first few: the job cuts the
    torn line off and finishes the file as one uninterrupted run would have written it."""
    lines = reference.splitlines(keepends=True)
    torn = lines[2][:cut] if cut > 0 else lines[2][:-1]  # -1: the whole line but its newline
    out = tmp_path / "out.jsonl"
    out.write_bytes(b"".join(lines[:2]) + torn)
    summary = run(_job(model_path, prompts_file, out))
    assert (summary.skipped, summary.generated_prompts) == (2, N - 2)
    assert_same_samples(read_results(out), _rows(reference))
    assert not lock_path(out).exists()


def test_results_of_other_settings_are_refused_not_mixed(model_path, prompts_file, reference, tmp_path, no_engine):
    out = tmp_path / "out.jsonl"
    out.write_bytes(b"".join(reference.splitlines(keepends=True)[:2]))
    before = out.read_bytes()
    for other in (["sampling.temperature=0.5"], ["engine.seed=7"], ["sampling.max_tokens=5"],
                  ["model=tiny_qwen3"]):
        for resume in ("true", "false"):
            with pytest.raises(JobError, match=r"out\.jsonl:1: written by a job with another model or sampling"):
                run(_job(model_path, prompts_file, out, *other, f"output.resume={resume}"))
            assert out.read_bytes() == before


def test_all_done_builds_no_engine_and_drops_a_torn_tail(model_path, prompts_file, reference, tmp_path, no_engine):
    out = tmp_path / "out.jsonl"
    out.write_bytes(reference + b'{"index": 4, "prompt_ha')  # a crash while rewriting the last line
    summary = run(_job(model_path, prompts_file, out))
    assert (summary.prompts, summary.skipped, summary.generated_prompts) == (N, N, 0)
    assert out.read_bytes() == reference
    summary = run(_job(model_path, prompts_file, out))  # and again: still nothing to do, nothing changed
    assert summary.skipped == N and out.read_bytes() == reference


# ---------------------------------------------------------------------------------------------
# failures mid-run, and a second job on the same output


def _fail_on_call(monkeypatch, k: int, exc: BaseException) -> None:
    """ray_job.generate raises `exc` on its k-th call (1-based), as a crash or Ctrl-C mid-job would."""
    real, calls = ray_job.generate, []

    def generate(*a, **kw):
        calls.append(1)
        if len(calls) == k:
            raise exc
        return real(*a, **kw)
    monkeypatch.setattr(ray_job, "generate", generate)


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), RuntimeError("CUDA error: device lost")])
def test_a_crash_mid_run_leaves_a_resumable_file(model_path, prompts_file, reference, tmp_path, monkeypatch, exc):
    out = tmp_path / "out.jsonl"
    _fail_on_call(monkeypatch, 2, exc)
    with pytest.raises(type(exc)):
        run(_job(model_path, prompts_file, out))
    first_chunk = b"".join(reference.splitlines(keepends=True)[:2])
    assert_same_samples(read_results(out), _rows(first_chunk))  # the first chunk, intact and complete
    assert not lock_path(out).exists()  # the lock went with the job
    monkeypatch.undo()
    summary = run(_job(model_path, prompts_file, out))
    assert (summary.skipped, summary.generated_prompts) == (2, N - 2)
    assert_same_samples(read_results(out), _rows(reference))


def test_a_second_job_on_the_same_output_is_refused(model_path, prompts_file, reference, tmp_path, monkeypatch):
    out = tmp_path / "out.jsonl"
    alias = tmp_path / "alias.jsonl"  # the same file under another name
    alias.symlink_to(out)
    real, refusals = ray_job.generate, []

    def generate(*a, **kw):
        # While the first job runs, start a second one (through the alias once the file exists).
        for path in (out, alias) if out.exists() else (out,):
            with pytest.raises(JobError, match="in use by another rollout job") as e:
                run(_job(model_path, prompts_file, path))
            refusals.append(str(e.value))
        return real(*a, **kw)
    monkeypatch.setattr(ray_job, "generate", generate)
    run(_job(model_path, prompts_file, out))
    monkeypatch.undo()
    assert len(refusals) == 5  # 1 before the first chunk is written, then 2 per chunk
    assert_same_samples(read_results(out), _rows(reference))  # no duplicated or interleaved lines
    assert not lock_path(out).exists()


def test_a_stale_lock_does_not_block_and_a_user_lock_file_is_kept(model_path, prompts_file, reference, tmp_path,
                                                                   no_engine):
    out = tmp_path / "out.jsonl"
    out.write_bytes(reference)
    lock = lock_path(out)
    lock.write_bytes(LOCK_MARK)  # left by a job killed with kill -9: nobody holds it
    assert run(_job(model_path, prompts_file, out)).skipped == N
    assert not lock.exists()
    lock.write_text("the user's own file\n")  # not ours: locked, but never written or removed
    assert run(_job(model_path, prompts_file, out)).skipped == N
    assert lock.read_text() == "the user's own file\n"
    assert out.read_bytes() == reference


# ---------------------------------------------------------------------------------------------
# overrides


@pytest.mark.parametrize("override, message", [
    ("sampling.temprature=1", "temprature"),
    ("sampling.n=eight", "sampling.n"),
    ("sampling.max_tokens=1.5", "sampling.max_tokens"),
    ("data.limit=abc", "data.limit"),
    ("output.resume=maybe", "output.resume"),
    ("nosuch.key=1", "nosuch"),
])
def test_overrides_hydra_rejects(override, message):
    with pytest.raises(ConfigCompositionException, match=message):
        compose_job(override)


@pytest.mark.parametrize("override, message", [
    ("+sampling.temprature=1", r"unknown config key 'sampling.temprature'"),  # Hydra's own hint for a typo
    ("+foo=1", r"unknown config key 'foo'"),
    ("++data.promptkey=text", r"unknown config key 'data.promptkey'"),
    ("sampling.n=-1", r"SamplingParams\.n=-1 is invalid"),
    ("sampling.n=0", r"SamplingParams\.n=0 is invalid"),
    ("sampling.max_tokens=-5", r"SamplingParams\.max_tokens=-5 is invalid"),
    ("sampling.max_tokens=0", r"SamplingParams\.max_tokens=0 is invalid"),
    ("sampling.temperature=-1", r"SamplingParams\.temperature=-1.0 is invalid"),
    ("data.batch_size=0", r"data\.batch_size must be >= 1"),
    ("data.limit=-1", r"data\.limit must be >= 1"),
    ("data.format=csv", r"data\.format must be auto, jsonl or parquet"),
])
def test_bad_values_fail_naming_the_key(model_path, prompts_file, tmp_path, no_engine, override, message):
    out = tmp_path / "out.jsonl"
    with pytest.raises(JobError, match=message) as e:
        run(compose_job(*job_overrides(model_path, prompts_file, out, override)))
    assert "\n" not in str(e.value)
    assert not out.exists() and not lock_path(out).exists()


@pytest.mark.parametrize("override, line", [
    ("sampling.temprature=1", "error: sampling.temprature: Key 'temprature' not in 'SamplingConfig'"),
    ("sampling.n=eight", "error: sampling.n: Value 'eight' of type 'str' could not be converted to Integer"),
    ("sampling.n=-2", "error: sampling: SamplingParams.n=-2 is invalid: must be an integer >= 1"),
    ("+sampling.tempreture=1", "error: unknown config key 'sampling.tempreture'"),
])
def test_cli_bad_override_is_one_error_line(tmp_path, monkeypatch, capsys, override, line):
    from atom.rollout.__main__ import main

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["atom-rollout", override, f"output.path={tmp_path / 'o.jsonl'}",
                                      f"hydra.run.dir={tmp_path / 'run'}"])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(line), err
    assert list(tmp_path.iterdir()) == []  # no run folder, no output


def test_cli_unknown_model_lists_the_options_on_one_line(tmp_path, monkeypatch, capsys):
    from atom.rollout.__main__ import main

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.setattr(sys, "argv", ["atom-rollout", "model=gpt5", f"hydra.run.dir={tmp_path / 'run'}"])
    with pytest.raises(SystemExit):
        main()
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert err.startswith("error: ") and "'model/gpt5'" in err and "tiny_llama" in err and "qwen3_8b" in err
