"""The OpenVINO engine: OpenVINO GenAI's continuous-batching pipeline under the engine's scheduler.

Chosen by the spike (docs/serving.md, "Which engine"): on this machine's CPU it decodes the
embedded model at 2.5-3x the torch engine. Everything a request sees stays the engine's own:
`Engine` queues, admits and cancels tickets, `Ticket.push` streams text, applies stop sequences
and `max_new_tokens`, and words every event; the pipeline only turns prompt ids into token ids.
So the two engines answer through one code path, and tests run on both.

`OpenVinoBatch` is the running requests on one loaded pipeline (one `LoadedModel`): new tickets
are added with their own sampling (a request the pipeline refuses fails alone), each scheduler
loop runs one `step()` of the pipeline (its own batching, paged KV cache and chunked prefill) and
hands each ticket the tokens it made. Hot swap works as with torch weights: a new pipeline loads
on the loader thread while the old one answers, and requests finish on the pipeline they started on.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Any

from .. import openvino_ir
from .batch import Ticket
from .config import EngineOptions
from .sampling import GREEDY_BELOW, PENALTY_FLOOR, SamplingParams

log = logging.getLogger(__name__)

# OpenVINO 2026.4's CPU plugin dies with SIGFPE when its pipeline gets one thread, or runs in a
# process allowed one CPU (openvinotoolkit/openvino#33300, reproduced here with `taskset -c 0`):
# the engine runs with at least two threads, and `auto` picks torch where there is one CPU.
MIN_CPUS = 2
ONE_CPU = ("this process may use one CPU, and OpenVINO's CPU plugin crashes with one thread "
           "(openvinotoolkit/openvino#33300)")
# A top_p this small keeps only the most likely token, as in the torch sampler; GenAI refuses 0.
_TOP_P_FLOOR = 1e-6
_request_ids = itertools.count(1)


def available() -> str | None:
    """Why this environment cannot run the engine (None: it can)."""
    if not openvino_ir.installed():
        return "openvino and openvino-tokenizers are not installed"
    try:
        import openvino_genai  # noqa: F401
    except ImportError:
        return "openvino-genai is not installed"
    return None


def load_pipeline(ir_dir: Path, options: EngineOptions, threads: int) -> Any:
    import openvino_genai as ov_genai

    sched = ov_genai.SchedulerConfig()
    sched.max_num_seqs = options.max_batch_size
    # Prompt tokens a step may take (chunked prefill beyond it); the spike measured 2048.
    sched.max_num_batched_tokens = max(2048, options.max_batch_size)
    # cache_size 0: the KV cache grows with the running requests instead of being reserved up front.
    # The CPU plugin's default KV cache is u8 (quantised by group): it flipped the embedded model's
    # first token on "What is the capital of France?" ("L'Étoile..." instead of "The capital of
    # France is Paris.", the two a quarter logit apart); f16 answers as transformers does, for 4%
    # of throughput (650 against 679 tokens/s, 16 x 64).
    return ov_genai.ContinuousBatchingPipeline(str(ir_dir), sched, "CPU", {"INFERENCE_NUM_THREADS": threads,
                                                                          "KV_CACHE_PRECISION": "f16"})


def generation_config(params: SamplingParams, eos_ids: frozenset[int]) -> Any:
    """The pipeline's config for one request. Stops and max_new_tokens are enforced by `Ticket`
    too; the pipeline's own copy frees the request's KV blocks as soon as it is done."""
    import openvino_genai as ov_genai

    g = ov_genai.GenerationConfig()
    g.max_new_tokens = params.max_new_tokens
    g.apply_chat_template = False
    g.stop_token_ids = set(eos_ids)
    if params.repetition_penalty != 1:
        g.repetition_penalty = max(params.repetition_penalty, PENALTY_FLOOR)
    greedy = params.temperature < GREEDY_BELOW or params.top_k == 1 or params.top_p < _TOP_P_FLOOR
    if not greedy:
        g.do_sample = True
        g.temperature = params.temperature
        g.top_p = min(1.0, params.top_p)
        g.top_k = params.top_k  # 0: no top-k
        if params.seed is not None:
            g.rng_seed = params.seed
    return g


class OpenVinoBatch:
    """The requests running on one `LoadedModel`'s pipeline (`lm.pipeline`)."""

    def __init__(self, lm: Any):
        self.lm = lm
        self.rows: list[Ticket] = []
        self._handles: dict[int, Any] = {}  # ticket id -> the pipeline's handle

    def add(self, ticket: Ticket, prompt: list[int]) -> None:
        """Start `ticket` on the pipeline; a config or prompt the pipeline refuses fails it alone."""
        import numpy as np
        import openvino as ov

        try:
            handle = self.lm.pipeline.add_request(next(_request_ids), ov.Tensor(np.array([prompt], dtype=np.int64)),
                                                  generation_config(ticket.params, self.lm.eos_ids))
        except Exception as err:
            log.warning("the OpenVINO pipeline refused request %s: %s", ticket.id, err)
            ticket.fail(422, f"the engine refused the request's parameters: {str(err).splitlines()[-1][:200]}")
            return
        self._handles[ticket.id] = handle
        self.rows.append(ticket)

    def step(self) -> int:
        """One pipeline step; each row takes the tokens it made. Returns how many tokens that was."""
        self._drop_finished()
        if not self.rows:
            return 0
        self.lm.pipeline.step()
        made = 0
        for row in self.rows:
            handle = self._handles[row.id]
            if handle.can_read():
                for out in handle.read().values():
                    for tok in out.generated_ids:
                        if row.done:
                            break
                        row.push(int(tok))
                        made += 1
            if not row.done and _finished(handle):
                row.finish("length" if len(row.out_ids) >= row.params.max_new_tokens else "stop")
        self._drop_finished()
        return made

    def _drop_finished(self) -> None:
        keep = []
        for row in self.rows:
            if row.cancelled and not row.done:
                row.finish("cancelled")
            if row.done:
                handle = self._handles.pop(row.id)
                if not _finished(handle):
                    handle.cancel()  # frees its KV blocks at the pipeline's next step
            else:
                keep.append(row)
        self.rows = keep

    def abandon(self) -> None:
        """After a failed step: the rows are failed by the caller; the pipeline forgets them."""
        for handle in self._handles.values():
            if not _finished(handle):
                handle.cancel()
        self._handles.clear()
        self.rows = []


def _finished(handle: Any) -> bool:
    import openvino_genai as ov_genai

    return handle.get_status() != ov_genai.GenerationStatus.RUNNING
