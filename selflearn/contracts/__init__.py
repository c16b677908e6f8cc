"""What crosses a process or component boundary, defined once.

- **The round result**: the one JSON line `selflearn train` prints and writes to the termination
  message file, which the operator parses and local mode reads from the trainer's stdout:

      {"status": "published", "round": 7, "checkpoint": "s3://b/p/run/r000007", "id": "run/r000007",
       "parent": "s3://b/p/run/r000006", "metrics": {"train_loss": 2.1, "ppl": {...}, ...}}
      {"status": "empty", "round": 7, "reason": "no new articles"}
      {"status": "failed", "round": 7, "reason": "training.maxLength 4096 exceeds ..."}

- **The round's metrics** (`RoundMetrics`): what the trainer measured, read by the gate
  (selflearn/policy.py), the operator's status, local mode's state and the dashboard. The trainer
  builds it, everyone else reads its fields: a renamed field is a type error, not a gate check
  that silently stops running.
- **A running round's progress**: the trainer's typed events (`PhaseStarted`, `StepDone`) to its
  listeners in process, and `RoundProgress`, the small JSON document the trainer keeps in its
  `--progress-file` for local mode's dashboard and terminal.
- **Checkpoint ids**: a round's directory `r000007`, its short id `<run>/r000007` (the
  `X-Selflearn-Checkpoint` header, the dashboard, the manifest), and `base:<model>` for the
  untrained base model.
- **Engine events**: what one generation streams from the engine to the HTTP layer (possibly
  through Ray): one `Start`, `Token`s, then `Done` or `Error` (`Completion`: the whole answer).
- **The engine's request and status**: what the ingress asks the model replica for
  (`EngineRequest`: messages and `RequestParams`) and what the replica says about itself
  (`EngineStatus`: its weights, queue and counters; `/status` and `/readyz` show it).

Each has its module (metrics, result, progress, ids, engine); import them from here.
"""

from .engine import (END_EVENTS, BatchStatus, Completion, Done, EngineCounters, EngineEvent, EngineRequest,
                     EngineStatus, Error, Message, RequestParams, Source, Start, Token, WeightsStatus)
from .ids import BASE_PREFIX, CHECKPOINT_URI_RE, base_id, checkpoint_id, checkpoint_id_of_uri, parse_round_dir, round_dir
from .metrics import ChatMetrics, FeedbackMetrics, KnowledgeMetrics, Pair, PreferenceMetrics, ResultError, RoundMetrics
from .progress import PhaseStarted, ProgressEvent, RoundProgress, StepDone
from .result import (ROUND_STATUSES, TERMINATION_LOG, TERMINATION_LOG_ENV, TERMINATION_MESSAGE_LIMIT, RoundResult,
                     result_line, write_termination_log)

__all__ = [
    "END_EVENTS", "BatchStatus", "Completion", "Done", "EngineCounters", "EngineEvent", "EngineRequest",
    "EngineStatus", "Error", "Message", "RequestParams", "Source", "Start", "Token", "WeightsStatus",
    "BASE_PREFIX", "CHECKPOINT_URI_RE", "base_id", "checkpoint_id", "checkpoint_id_of_uri", "parse_round_dir",
    "round_dir",
    "ChatMetrics", "FeedbackMetrics", "KnowledgeMetrics", "Pair", "PreferenceMetrics", "ResultError", "RoundMetrics",
    "PhaseStarted", "ProgressEvent", "RoundProgress", "StepDone",
    "ROUND_STATUSES", "TERMINATION_LOG", "TERMINATION_LOG_ENV", "TERMINATION_MESSAGE_LIMIT", "RoundResult",
    "result_line", "write_termination_log",
]
