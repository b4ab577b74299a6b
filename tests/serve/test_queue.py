import pytest

from readmoe.errors import ReadmoeError
from readmoe.serve.queue import RequestQueue
from readmoe.serve.schedulers import Scheduler, make_scheduler
from readmoe.serve.types import Batch, Budget, Chunk, Request, RequestState


def test_request_reveals_its_tokens_in_order():
    request = Request("a", 0.0, [1, 1, 2], max_tokens=3)
    assert request.pending_experts == [1, 1, 2] and request.next_expert == 1
    request.num_computed = 3
    assert request.pending_experts == [] and request.next_expert is None  # not sampled yet
    request.output_experts.append(4)
    assert not request.in_prefill and request.next_expert == 4


def test_lifecycle_chunked_prefill_decode_and_early_stop():
    queue = RequestQueue()
    queue.add(Request("a", 0.0, [1, 1, 2, 2], max_tokens=5))
    queue.add(Request("b", 0.1, [3], max_tokens=5))
    fcfs, budget = make_scheduler("fcfs"), Budget(max_tokens=3, max_seqs=4)

    batch = queue.schedule(fcfs, budget)  # a's first 3 prompt tokens: no output yet
    assert [(c.request_id, c.num_tokens, c.samples) for c in batch.chunks] == [("a", 3, False)]
    assert queue.running[0].state is RequestState.RUNNING and queue.waiting[0].steps_waited == 1
    assert queue.complete(batch, {}, now=1.0) == []

    batch = queue.schedule(fcfs, budget)  # a's last prompt token samples output 1; b prefills
    assert [(c.request_id, c.samples) for c in batch.chunks] == [("a", True), ("b", True)]
    queue.complete(batch, {"a": 6, "b": None}, now=2.0)  # b stops early (EOS)
    a = queue.running[0]
    assert a.output_experts == [6] and a.output_times == [2.0]
    assert [r.request_id for r in queue.finished] == ["b"] and queue.finished[0].num_output == 1

    for step in range(4):
        batch = queue.schedule(fcfs, budget)
        assert [(c.request_id, c.experts, c.is_prefill) for c in batch.chunks] == [
            ("a", (6 + step,), False)]
        queue.complete(batch, {"a": 7 + step}, now=3.0 + step)
    assert a.state is RequestState.FINISHED and a.num_output == 5
    assert a.output_experts == [6, 7, 8, 9]  # the 5th output is never fed back
    assert not queue.pending()


def test_queue_rejects_duplicates_and_started_requests():
    queue = RequestQueue()
    queue.add(Request("a", 0.0, [1], 1))
    with pytest.raises(ReadmoeError, match="already in the queue"):
        queue.add(Request("a", 0.0, [1], 1))
    with pytest.raises(ReadmoeError, match="already started"):
        queue.add(Request("b", 0.0, [1], 1, num_computed=1))


def test_invalid_requests_and_budgets():
    with pytest.raises(ReadmoeError, match="no tokens"):
        Request("a", 0.0, [], 1)
    with pytest.raises(ReadmoeError, match="max_tokens"):
        Request("a", 0.0, [1], 0)
    with pytest.raises(ReadmoeError, match="budget"):
        Budget(0, 1)


class _Greedy(Scheduler):
    """Takes the first request's pending tokens from ``skip`` on, whatever the budget."""

    name = "greedy"

    def __init__(self, skip=0):
        self.skip = skip

    def schedule(self, waiting, running, budget, view=None):
        r = [*running, *waiting][0]
        return Batch((Chunk(r.request_id, r.num_computed + self.skip,
                            tuple(r.pending_experts[self.skip:]), True, True),))


def test_queue_rejects_a_scheduler_that_breaks_the_rules():
    queue = RequestQueue()
    queue.add(Request("a", 0.0, [1, 2, 3], 2))
    with pytest.raises(ReadmoeError, match="exceeded its budget"):
        queue.schedule(_Greedy(), Budget(2, 4))
    with pytest.raises(ReadmoeError, match="chunking rule"):
        queue.schedule(_Greedy(skip=1), Budget(8, 4))


def test_abort_takes_a_request_out_once():
    queue = RequestQueue()
    first, second = Request("a", 0.0, [0, 1], 2), Request("b", 0.0, [1], 2)
    queue.add(first)
    queue.add(second)
    queue.schedule(make_scheduler("fcfs"), Budget(2, 1))  # "a" runs, "b" waits
    assert queue.abort("a") is first and queue.abort("b") is second
    assert not queue.waiting and not queue.running and not queue.finished
    with pytest.raises(ReadmoeError, match="not waiting or running"):
        queue.abort("a")
