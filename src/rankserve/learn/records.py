"""Served traffic as training data: ``rankserve serve --record-lengths PATH`` keeps, for every
finished request, what fine-tuning the ranker needs, in SQLite.

A record holds the prompt's and the output's token counts, the request's max_tokens and finish
reason, a digest of the prompt, and the prompt's features: the output of the encoder's frozen
bottom layers (bfloat16, one row per encoder token), which is all the trainable top of a ranker
reads. The frozen layers are the pretrained encoder's, so the features fit every ranker with the
same number of trainable layers and encoder tokens (the file's ``spec`` says which). The prompt's
text is kept only with ``--record-prompts``.

The engine thread only queues a finished request (its features were kept when it was scored);
a writer thread computes what is missing (prompts answered from the score cache) and inserts in
batches. A failed write never fails a request: it is counted (``RecordStats.failed``, exported in
/metrics) and logged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from rankserve.core.request import FinishReason, Request, RequestStatus
from rankserve.learn.predictors import TextModelPredictor, default_weights
from rankserve.learn.text_model import TextLengthModel, inference_dtype, torch_threads

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY,
    finished_at REAL NOT NULL,          -- unix time
    prompt_tokens INTEGER NOT NULL,     -- the served model's prompt tokens
    output_tokens INTEGER NOT NULL,
    max_tokens INTEGER NOT NULL,
    finish_reason TEXT NOT NULL,        -- stop | length
    prompt_digest BLOB NOT NULL,        -- blake2b-128 of the prompt text
    feature_tokens INTEGER NOT NULL,
    features BLOB NOT NULL,             -- bfloat16 [feature_tokens, hidden], row-major
    prompt_text TEXT                    -- NULL unless --record-prompts
);
"""


@dataclass(frozen=True)
class FeatureSpec:
    """Which features a records file holds: the frozen layers of which backbone, on how many tokens."""

    backbone: str
    bottom_layers: int
    max_length: int
    hidden: int

    @classmethod
    def of(cls, model: TextLengthModel) -> FeatureSpec:
        return cls("all-MiniLM-L6-v2", len(model._bottom), model.config.max_length, model.hidden_size)


@dataclass
class RecordStats:
    written: int = 0
    failed: int = 0  # finished requests whose record was lost (write or feature computation failed)


@dataclass
class _Pending:
    finished_at: float
    prompt_tokens: int
    output_tokens: int
    max_tokens: int
    finish_reason: str
    text: str
    features: torch.Tensor | None


def open_records(path: str | Path, spec: FeatureSpec) -> sqlite3.Connection:
    """Open (or create) a records file for ``spec``; refuses a file recorded with another spec."""
    conn = sqlite3.connect(str(path), check_same_thread=False)
    try:
        conn.executescript(_SCHEMA)
        row = conn.execute("SELECT value FROM meta WHERE key = 'spec'").fetchone()
        if row is None:
            conn.execute("INSERT INTO meta VALUES ('spec', ?)", (json.dumps(asdict(spec)),))
            conn.commit()
        elif FeatureSpec(**json.loads(row[0])) != spec:
            raise ValueError(f"{path} holds features of {row[0]}, not of {json.dumps(asdict(spec))}: "
                             "record into a new file")
    except BaseException:
        conn.close()
        raise
    return conn


class LengthRecorder:
    """Queue finished requests (``record``, from the engine thread) and write them in batches."""

    def __init__(self, path: str | Path, model: TextLengthModel,
                 take_features: Callable[[Request], torch.Tensor | None] | None = None,
                 keep_prompts: bool = False, batch_size: int = 64, flush_s: float = 2.0) -> None:
        self.path = Path(path)
        self.model = model
        self.spec = FeatureSpec.of(model)
        self.take_features = take_features
        self.keep_prompts = keep_prompts
        self.batch_size = batch_size
        self.flush_s = flush_s
        self.stats = RecordStats()
        self._conn = open_records(self.path, self.spec)  # fails here, at start-up, on a bad path or file
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="rankserve-records", daemon=True)
        self._thread.start()

    @classmethod
    def for_predictor(cls, path: str | Path, predictor: object, keep_prompts: bool = False) -> LengthRecorder:
        """Reuse the serving text model's features when the predictor has one (captured as it
        scores, at no extra cost); otherwise the shipped ranker computes them on the writer thread."""
        text_predictor = getattr(predictor, "prompt_predictor", predictor)  # the probe scores with one
        if isinstance(text_predictor, TextModelPredictor):
            text_predictor.capture_bottoms = True
            return cls(path, text_predictor.model, text_predictor.take_bottom, keep_prompts)
        return cls(path, TextLengthModel.load(default_weights("ranker"), inference_dtype()), None, keep_prompts)

    def record(self, req: Request) -> None:
        """Queue a request that has ended; only finished ones (stop or length) are labels. Never raises."""
        try:
            features = self.take_features(req) if self.take_features is not None else None
            if req.status is not RequestStatus.FINISHED or req.finish_reason not in (FinishReason.STOP,
                                                                                       FinishReason.LENGTH):
                return
            if req.prompt_text is None:
                raise ValueError(f"request {req.request_id} has no prompt text")
            self._queue.put(_Pending(time.time(), req.prompt_len, req.num_output_tokens, req.sampling.max_tokens,
                                     req.finish_reason.value, req.prompt_text, features))
        except Exception:  # noqa: BLE001 - recording must never fail a request
            self.stats.failed += 1
            log.exception("could not queue the record of %s", req.request_id)

    def close(self, timeout: float = 30.0) -> None:
        """Write what is queued, then stop the writer."""
        self._queue.put(None)
        self._thread.join(timeout)
        self._conn.close()

    # ---- the writer thread -----------------------------------------------------------------
    def _run(self) -> None:
        """Write a batch when it is full or its oldest record has waited ``flush_s``."""
        batch: list[_Pending] = []
        oldest = 0.0
        while True:
            wait = None if not batch else max(0.0, oldest + self.flush_s - time.monotonic())
            try:
                item = self._queue.get(timeout=wait)
            except queue.Empty:
                self._write(batch)
                batch = []
                continue
            if item is None:
                self._write(batch)
                return
            if not batch:
                oldest = time.monotonic()
            batch.append(item)
            if len(batch) >= self.batch_size:
                self._write(batch)
                batch = []

    def _write(self, batch: Sequence[_Pending]) -> None:
        if not batch:
            return
        try:
            missing = [p for p in batch if p.features is None]
            if missing:
                with torch_threads(1):  # beside the engine, not in its way
                    for p, bottom in zip(missing, self.model.encode_bottom([p.text for p in missing])):
                        p.features = bottom
            rows = [(p.finished_at, p.prompt_tokens, p.output_tokens, p.max_tokens, p.finish_reason,
                     hashlib.blake2b(p.text.encode(), digest_size=16).digest(), p.features.shape[0],
                     p.features.to(torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes(),
                     p.text if self.keep_prompts else None) for p in batch]
            with self._conn:
                self._conn.executemany(
                    "INSERT INTO records (finished_at, prompt_tokens, output_tokens, max_tokens, finish_reason,"
                    " prompt_digest, feature_tokens, features, prompt_text) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            self.stats.written += len(batch)
        except Exception:  # noqa: BLE001 - a full disk or a locked file must not stop serving
            self.stats.failed += len(batch)
            log.exception("writing %d length records to %s failed (%d lost so far)", len(batch), self.path,
                          self.stats.failed)


@dataclass
class Records:
    """A records file read back for training."""

    spec: FeatureSpec
    features: list[torch.Tensor]  # bfloat16 [tokens, hidden] each
    output_tokens: np.ndarray
    observed: np.ndarray  # True: finished by stop (the length is exact); False: cut at max_tokens
    prompt_tokens: np.ndarray
    digests: list[bytes]


def read_records(path: str | Path, limit: int | None = None) -> Records:
    """The first ``limit`` records (in the order they were written) of a records file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'spec'").fetchone()
        if row is None:
            raise ValueError(f"{path} is not a records file (no spec)")
        spec = FeatureSpec(**json.loads(row[0]))
        query = ("SELECT output_tokens, finish_reason, prompt_tokens, prompt_digest, feature_tokens, features"
                 " FROM records ORDER BY id" + ("" if limit is None else f" LIMIT {int(limit)}"))
        rows = conn.execute(query).fetchall()
    except sqlite3.DatabaseError as exc:
        raise ValueError(f"{path} is not a records file: {exc}") from exc
    finally:
        conn.close()
    features = [torch.frombuffer(bytearray(blob), dtype=torch.int16).view(torch.bfloat16).view(n, spec.hidden)
                for *_, n, blob in rows]
    return Records(spec, features, np.array([r[0] for r in rows], dtype=np.int64),
                   np.array([r[1] == FinishReason.STOP.value for r in rows], dtype=bool),
                   np.array([r[2] for r in rows], dtype=np.int64), [r[3] for r in rows])
