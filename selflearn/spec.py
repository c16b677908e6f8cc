"""The LearnerRun spec as typed config, shared by the trainer, `selflearn local` and the operator.

Field names follow the Kubernetes manifest (camelCase); Python code uses snake_case attributes.
Unknown fields are rejected so that a typo in a manifest is an error, not a silent default.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

from .basemodel import EMBEDDED_MODEL  # noqa: F401 - re-exported: the spec names the bundled model
from .validation import one_line
from .yaml_input import load_yaml_file

RUN_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,38}[a-z0-9])?$")
# A Kubernetes object name (DNS-1123 subdomain): what a Secret or a PersistentVolumeClaim may be called.
OBJECT_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"
# A store: file:// with a path, or s3:// with a bucket. The CRD carries it as the field's pattern;
# `store_uri_problem` says the same in words (and decides first, so users read its message).
STORE_URI_PATTERN = r"^(file://\S.*|s3://[^/\s].*)$"
# A run config as JSON (aliases expanded, defaults filled in) stays well under the 1 MiB a trainer
# reads back (yaml_input.MAX_BYTES) once a driver writes it out as block YAML.
MAX_RUN_CONFIG_JSON = 256 * 1024


def store_uri_problem(uri: str) -> str | None:
    """Why `uri` names no store (None when it does): `file://` alone would be the current directory."""
    if re.fullmatch(STORE_URI_PATTERN, uri):
        return None
    if uri.startswith("file://"):
        return (f"{uri!r} has no path (file:// alone is the current directory): write file:///absolute/dir "
                "or file://./relative/dir")
    if uri.startswith("s3://"):
        return f"{uri!r} has no bucket: write s3://bucket or s3://bucket/prefix"
    return f"{uri!r} must start with file:// or s3://"


class _Spec(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class WikipediaSource(_Spec):
    language: str = Field("en", pattern=r"^[a-z]{2,3}(-[a-z]+)?$")
    articles_per_round: int = Field(32, ge=1, le=500)
    # Base URL of the REST API; overridable so tests can point it at a recorded local server.
    endpoint: str | None = None


class SnapshotSource(_Spec):
    language: Literal["en", "fr", "es"] = "en"
    articles_per_round: int = Field(32, ge=1, le=5000)


class FilesSource(_Spec):
    paths: list[str] = Field(default_factory=list)
    urls: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _not_empty(self) -> "FilesSource":
        if not self.paths and not self.urls:
            raise ValueError("a files source needs at least one path or url")
        return self


class FeedbackSource(_Spec):
    """What the chat's users said through `/feedback`: corrections and thumbs up/down."""

    # Where `/feedback` writes; default: the run's own store, `<storage.uri>/<run>/feedback`.
    uri: str | None = Field(None, pattern=STORE_URI_PATTERN)
    # One client (API key or address) adds at most this many items a round; the rest are dropped.
    per_client_cap: int = Field(5, ge=1, le=10_000)
    # Items learned in one round; the rest wait for the next.
    max_items: int = Field(200, ge=1, le=100_000)
    # Thumbs without a correction wait until at least this many can be learned together.
    min_ratings: int = Field(8, ge=1, le=100_000)
    # Phrasings of its question a correction is taught under (the question as asked first), and
    # the passes over them after the round's main training.
    repeats: int = Field(8, ge=1, le=8)
    epochs: int = Field(3, ge=1, le=20)
    # That pass's learning rate; default the round's (training.learningRate).
    learning_rate: float | None = Field(None, gt=0, le=1.0)
    # The preference phase after supervised training: DPO on corrections, KTO on ratings, both
    # against the parent weights; off trains corrections as supervised examples only.
    preference: Literal["dpo-kto", "off"] = "dpo-kto"
    beta: float = Field(0.1, gt=0, le=10)
    preference_learning_rate: float = Field(5.0e-5, gt=0, le=1.0)
    preference_epochs: float = Field(2, gt=0, le=50)
    # Weight of the corrections' own likelihood beside the DPO loss (TRL's rpo_alpha).
    sft_weight: float = Field(1.0, ge=0, le=100)
    # Records newer than this wait for the next round (a write may still be landing).
    grace_seconds: float = Field(5, ge=0, le=86_400)

    @field_validator("uri", mode="before")
    @classmethod
    def _uri(cls, v: Any) -> Any:
        if isinstance(v, str) and (problem := store_uri_problem(v)):
            raise ValueError(problem)
        return v


SOURCE_KINDS = ("wikipedia", "snapshot", "files", "feedback")


class SourceSpec(_Spec):
    """Exactly one of wikipedia, snapshot, files or feedback."""

    wikipedia: WikipediaSource | None = None
    snapshot: SnapshotSource | None = None
    files: FilesSource | None = None
    feedback: FeedbackSource | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> "SourceSpec":
        kinds = [k for k in SOURCE_KINDS if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(f"each source must set exactly one of {', '.join(SOURCE_KINDS)} (got {kinds or 'none'})")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in SOURCE_KINDS if getattr(self, k) is not None)


class LoraSpec(_Spec):
    r: int = Field(16, ge=1, le=512)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    # merged: fold the adapter into the weights (a plain checkpoint); otherwise save the adapter only.
    merge: bool = True


class TrainingSpec(_Spec):
    epochs: float = Field(1, gt=0, le=100)
    batch_size: int = Field(4, ge=1, le=1024)
    gradient_accumulation: int = Field(4, ge=1, le=1024)
    learning_rate: float = Field(2.0e-5, gt=0, le=1.0)
    weight_decay: float = Field(0.01, ge=0, le=1.0)
    max_length: int = Field(512, ge=16, le=131072)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    method: Literal["full", "lora"] = "full"
    # Compile the repeated decoder blocks (torch.compile, regional). auto: on where a compiler is
    # available (g++ on a CPU, a C compiler for triton on CUDA); the first round on a machine
    # pays the compile once.
    compile: Literal["auto", "on", "off"] = "auto"
    lora: LoraSpec = Field(default_factory=LoraSpec)
    warmup_ratio: float = Field(0.0, ge=0, le=0.5)
    # Fraction of this round's training blocks drawn from earlier rounds' articles (limits forgetting).
    replay_fraction: float = Field(0.0, ge=0, le=0.9)
    # Fresh articles fetched per round but held out of training, to measure generalisation.
    eval_articles: int = Field(8, ge=0, le=500)
    # Size of the fixed general set, identical every round.
    general_articles: int = Field(16, ge=1, le=500)
    min_chars: int = Field(200, ge=1)
    blocklist: list[str] = Field(default_factory=list)
    seed: int = 0
    # What the round trains on: the raw articles (text), question/answer chat examples made from
    # them (chat), or both in the same blocks (mixed: QA exposure together with the documents).
    format: Literal["text", "chat", "mixed"] = "mixed"
    # Question/answer pairs made from each article (what is / tell me about / when / ...).
    qa_pairs_per_article: int = Field(4, ge=1, le=16)
    # Chat examples replayed each round from the base model's own answers (against forgetting).
    chat_replay: int = Field(12, ge=0, le=1000)
    # Articles of earlier rounds whose first question ("What is X?") is asked again, so that what
    # earlier rounds taught is not forgotten by the next ones.
    qa_review: int = Field(16, ge=0, le=1000)
    # Share of the round's question/answer pairs asked after passages (the article's and another's,
    # or the other's alone), as serving asks with its memory on: the model learns to read it.
    # Measured on local mode's rounds (0.25 there: docs/memory.md); off by default until measured
    # on others (examples/learnerrun-tiny.yaml's 1-epoch round lost one format-check answer with it).
    qa_reading: float = Field(0.0, ge=0, le=1)
    # One more pair per article asked from its first fact back to its subject (where it allows).
    qa_named: bool = False
    # Extra renderings of each article's text trained beside it (chat and mixed formats): the lead
    # sentence first, the subject named where a sentence opens with a pronoun, the rest shuffled.
    renderings: int = Field(0, ge=0, le=4)
    # Ask parent and candidate questions about the articles and the chat-retention prompts.
    chat_eval: bool = True
    # Keep every learned article in the checkpoint's memory (selflearn/memory.py), searched at
    # answer time; off: checkpoints carry weights only.
    memory: bool = True
    # Optional 'package.module:function' returning question/answer pairs for an article.
    pair_generator: str | None = None

    @field_validator("learning_rate", mode="before")
    @classmethod
    def _lr_positive(cls, v: Any) -> Any:
        if isinstance(v, (int, float)) and v <= 0:
            raise ValueError(f"learningRate must be > 0, got {v}")
        return v


class ScheduleSpec(_Spec):
    interval_seconds: int = Field(600, ge=0)
    max_rounds: int | None = Field(None, ge=1)


class StorageSpec(_Spec):
    uri: str = Field("file://./.selflearn/checkpoints", pattern=STORE_URI_PATTERN)
    endpoint: str | None = None
    region: str | None = None
    credentials_secret: str | None = None
    keep_checkpoints: int = Field(5, ge=1, le=1000)
    delete_on_removal: bool = False

    # Before the pattern above, so that a bad uri reads as a sentence, not as the regex.
    @field_validator("uri", mode="before")
    @classmethod
    def _scheme(cls, v: Any) -> Any:
        if isinstance(v, str) and (problem := store_uri_problem(v)):
            raise ValueError(problem)
        return v


class PromotionSpec(_Spec):
    # Fractions: 0.02 allows the new weights' perplexity to be at most 2% above the parent's.
    max_perplexity_increase: float = Field(0.02, ge=0, le=10)
    max_fresh_perplexity_increase: float = Field(0.05, ge=0, le=10)
    # Chat retention: the parent's perplexity of the reference chat answers over the candidate's
    # must be at least this (0.95: at most ~5% less likely to answer as the base model did).
    min_chat_retention: float = Field(0.95, ge=0, le=1)
    # Knowledge on the articles the round learned may fall at most this far below the parent's
    # (a score in [0, 1]; 0: not worse).
    max_knowledge_drop: float = Field(0.0, ge=0, le=1)
    pinned_checkpoint: str | None = None


class TrainerSpec(_Spec):
    image: str = "ghcr.io/selflearn/trainer:0.1.0"
    resources: dict[str, Any] = Field(default_factory=dict)
    backoff_limit: int = Field(2, ge=0, le=20)
    active_deadline_seconds: int = Field(3600, ge=60)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    # A PersistentVolumeClaim kept across rounds for the trainer's compiled kernels and hub
    # downloads: without it every round's pod compiles from cold (~30 s on a CPU) and downloads
    # a hub model again.
    cache_volume_claim: str | None = Field(None, pattern=OBJECT_NAME_PATTERN)
    # A round on several processes (docs/distributed.md): `workers` pods of an Indexed Job, each
    # running `procsPerWorker` ranks under torchrun (default: the pod's GPUs, else 1), which find
    # each other through a headless Service. One worker with one process is today's plain Job.
    workers: int = Field(1, ge=1, le=64)
    procs_per_worker: int | None = Field(None, ge=1, le=16)
    # How the gradients are shared: `ddp` (every rank a whole replica, gradients all-reduced),
    # `fsdp` (FSDP2: parameters, gradients and optimizer state sharded across ranks) or `auto`
    # (fsdp where a full fine-tune's ~16 bytes a parameter would not fit one device, else ddp).
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
    # How long the ranks wait for each other to join before the round fails.
    rendezvous_timeout_seconds: int = Field(600, ge=10, le=7200)


class IngressSpec(_Spec):
    host: str | None = None
    class_name: str | None = None
    tls_secret: str | None = None


class MemoryUseSpec(_Spec):
    """How answers read the checkpoint's memory of learned articles (selflearn/memory.py)."""

    enabled: bool = True
    passages: int = Field(2, ge=1, le=8)  # passages read before a question, at most
    # BM25 score a passage needs when the question describes it without naming its title.
    threshold: float = Field(5.0, ge=0, le=1000)

    @model_validator(mode="before")
    @classmethod
    def _switch(cls, v: Any) -> Any:
        # `memory: off` (YAML reads it as false) and `memory: on` are the short forms.
        return {"enabled": v} if isinstance(v, bool) else v


class ServingSpec(_Spec):
    image: str = "ghcr.io/selflearn/serve:0.1.0"
    replicas: int = Field(1, ge=0, le=64)
    resources: dict[str, Any] = Field(default_factory=dict)
    ingress: IngressSpec = Field(default_factory=IngressSpec)
    memory: MemoryUseSpec = Field(default_factory=MemoryUseSpec)
    # What decodes (docs/serving.md, "Which engine"): `auto` is OpenVINO GenAI where it can run (a
    # CPU, a Llama-family model), else torch. With auto or openvino the trainer publishes each
    # checkpoint's OpenVINO IR beside its weights, so replicas load it instead of converting it.
    engine: Literal["auto", "torch", "openvino"] = "auto"
    # Weights quantised at load on the OpenVINO engine (docs/serving.md, "Quantization").
    quantization: Literal["none", "int8", "q4"] = "none"


class LearnerRunSpec(_Spec):
    base_model: str = EMBEDDED_MODEL
    sources: list[SourceSpec] = Field(default_factory=lambda: [SourceSpec(snapshot=SnapshotSource())], min_length=1)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    suspend: bool = False
    storage: StorageSpec = Field(default_factory=StorageSpec)
    promotion: PromotionSpec = Field(default_factory=PromotionSpec)
    trainer: TrainerSpec = Field(default_factory=TrainerSpec)
    serving: ServingSpec = Field(default_factory=ServingSpec)

    @field_validator("base_model")
    @classmethod
    def _model_id(cls, v: str) -> str:
        v = v.strip()
        if not v:
            raise ValueError("baseModel must not be empty")
        if v.startswith("embedded:") and v != EMBEDDED_MODEL:
            raise ValueError(f"unknown embedded model {v!r}; the bundled one is {EMBEDDED_MODEL!r}")
        return v

    @model_validator(mode="after")
    def _one_feedback(self) -> "LearnerRunSpec":
        if sum(s.kind == "feedback" for s in self.sources) > 1:
            raise ValueError("sources: at most one feedback source")
        return self

    @model_validator(mode="after")
    def _sharding_trains_every_weight(self) -> "LearnerRunSpec":
        if self.trainer.strategy == "fsdp" and self.training.method == "lora":
            raise ValueError("trainer.strategy fsdp shards a full fine-tune; a LoRA run trains a few "
                             "adapter weights: use strategy ddp (or auto)")
        return self

    @property
    def feedback(self) -> FeedbackSource | None:
        return next((s.feedback for s in self.sources if s.feedback is not None), None)

    @property
    def article_sources(self) -> list[SourceSpec]:
        return [s for s in self.sources if s.kind != "feedback"]


class RunConfig(_Spec):
    """What a trainer needs: the run's name and its spec (the LearnerRun manifest's shape)."""

    name: str = "local"
    spec: LearnerRunSpec = Field(default_factory=LearnerRunSpec)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not RUN_NAME_RE.match(v):
            raise ValueError(f"run name {v!r} must be lowercase alphanumerics and '-', at most 40 chars")
        return v


def format_validation_error(err: ValidationError) -> str:
    """One line per problem, with the manifest's field path: `training.learningRate: must be > 0`."""
    return one_line(err.errors())


def parse_spec(data: dict[str, Any]) -> LearnerRunSpec:
    """Validate a spec dict; raise ValueError with a one-line message naming each bad field."""
    try:
        return LearnerRunSpec.model_validate(data or {})
    except ValidationError as err:
        raise ValueError(f"invalid LearnerRun spec: {format_validation_error(err)}") from None


def load_run_config(path: str | Path) -> RunConfig:
    """Read a run config: a LearnerRun manifest, a bare spec, or {name, spec}.

    The file is read within yaml_input's limits (size, alias expansion, nesting, no duplicate
    keys); every problem is a ValueError of one line naming the file."""
    p = Path(path)
    doc = load_yaml_file(p, what="run config")
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ValueError(f"run config {p} must be a mapping, got {type(doc).__name__}")
    if doc.get("kind") == "LearnerRun":
        doc = {"name": (doc.get("metadata") or {}).get("name", "local"), "spec": doc.get("spec") or {}}
    elif "spec" not in doc:
        doc = {"name": doc.pop("name", "local"), "spec": doc}
    try:
        config = RunConfig.model_validate(doc)
    except ValidationError as err:
        raise ValueError(f"invalid run config {p}: {format_validation_error(err)}") from None
    # Free-form blocks (trainer.resources, tolerations) are written out again by both drivers (the
    # local run.yaml the trainer reads back, the operator's ConfigMap): bound what they carry.
    size = len(json.dumps(config.model_dump(by_alias=True, mode="json", exclude_none=True)))
    if size > MAX_RUN_CONFIG_JSON:
        raise ValueError(f"run config {p} holds {size / 1024:.0f} KiB as JSON (aliases expanded, defaults filled "
                         f"in); the limit is {MAX_RUN_CONFIG_JSON // 1024} KiB")
    return config
