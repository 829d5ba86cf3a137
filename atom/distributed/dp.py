"""Data-parallel attention (ep_mode="alltoall"): each rank of the engine runs a share of the
requests of a generate call, then every rank gets every result back (SPMD in, SPMD out)."""
from __future__ import annotations

from atom.distributed.parallel_state import ParallelGroup
from atom.engine.sequence import Request, Sequence, SeqStatus

_SEQ_FIELDS = ("logprobs", "top_logprobs", "logprob_ranks", "finish_reason", "stop_reason", "stop_text_len",
               "weight_spans", "routed")


def my_requests(requests: list[Request], dp: ParallelGroup) -> list[Request]:
    """Round-robin by position: rank r runs requests r, r + W, r + 2W, ..."""
    return requests if dp.size == 1 else requests[dp.rank::dp.size]


def share_results(requests: list[Request], dp: ParallelGroup) -> int:
    """Fill in the requests other ranks ran (their sequences and prompt logprobs); returns how
    many sequences arrived. Collective over dp."""
    if dp.size == 1:
        return 0
    mine = [(req.index, req.prompt_logprobs, req.prompt_logprob_ranks,
             [(s.sample_index, s.token_ids, *(getattr(s, f) for f in _SEQ_FIELDS)) for s in req.sequences])
            for req in my_requests(requests, dp)]
    by_index = {req.index: req for req in requests}
    arrived = 0
    for r, results in enumerate(dp.all_gather_object(mine)):
        if r == dp.rank:
            continue
        for index, prompt_logprobs, prompt_ranks, seqs in results:
            req = by_index[index]
            req.prompt_logprobs, req.prompt_logprob_ranks = prompt_logprobs, prompt_ranks
            req.sequences = []
            for sample_index, token_ids, *values in seqs:
                seq = Sequence(req, sample_index, token_ids)
                for f, v in zip(_SEQ_FIELDS, values):
                    setattr(seq, f, v)
                seq.status, seq.fork_pending = SeqStatus.FINISHED, False
                req.sequences.append(seq)
                arrived += 1
    return arrived
