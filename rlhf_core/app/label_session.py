"""What the pages of `rlhf label` do, apart from HTTP: draw or take a prompt and have two
answers written to it, record a vote durably, and count the votes.

The answers come from the champion and the candidate (sides drawn at random for each pair)
or are two samples of one model; who wrote which stays hidden until the vote and is shown
after it. A pair drawn from the prompt set is offered to up to `votes_per_pair` annotators,
so that annotators' agreement can be measured; a typed prompt's pair is only its typer's.
Each vote goes to the votes log (`rlhf_core.data.votes`) before the caller hears "saved";
the tally is `rlhf_core.evaluation.human_votes` over the log.
"""

from __future__ import annotations

import random
import threading
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from rlhf_core.chat import ChatModel, context_budget, render_prompt, stream_reply
from rlhf_core.config.data import ValidationSettings
from rlhf_core.config.training import SamplingSettings
from rlhf_core.data.votes import VoteJournal, preference_rows, quarantine_reasons, utc_now
from rlhf_core.evaluation.human_votes import (
    VERDICTS,
    annotator_agreement,
    head_to_head,
    verdict_counts,
)
from rlhf_core.generation import derived_seed

Messages = list[dict[str, str]]

MAX_ANNOTATOR_CHARS = 64
OPEN_PAIRS = 1000  # pairs kept open for further annotators; the oldest are dropped beyond


class LabelError(Exception):
    """A request the page must refuse: an HTTP status and one sentence for the person."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Writer:
    """A model that writes answers: its role on the page ("champion", "candidate", or the
    model's name for two samples of one model) and what it is (name, version, folder)."""

    label: str
    chat_model: ChatModel

    @property
    def description(self) -> str:
        return self.chat_model.description


@dataclass
class Comparison:
    """Two answers to one prompt, sides fixed; who was served it and who voted on it."""

    id: str
    prompt: Messages
    answer_a: str
    answer_b: str
    writer_a: Writer
    writer_b: Writer
    seeds: tuple[int, int]
    typed_by: str | None = None  # a typed prompt's pair is only its typer's
    served: set[str] = field(default_factory=set)
    voted: set[str] = field(default_factory=set)


class LabelSession:
    """What the page's requests do: draw or take a prompt and generate its pair, record a
    vote, count the votes. Thread-safe: uvicorn runs requests on several threads."""

    def __init__(
        self,
        writers: Sequence[Writer],
        sampling: SamplingSettings,
        prompts: Sequence[Messages],
        journal: VoteJournal,
        validation: ValidationSettings,
        *,
        seed: int = 0,
        votes_per_pair: int = 2,
        annotator_required: bool = False,
    ) -> None:
        if len(writers) not in (1, 2):
            raise ValueError("a label session compares two models or two samples of one")
        self.writers = list(writers)
        self.sampling = sampling
        self.prompts = list(prompts)
        random.Random(seed).shuffle(self.prompts)
        self.journal = journal
        self.validation = validation
        self.seed = seed
        self.votes_per_pair = votes_per_pair
        self.annotator_required = annotator_required
        self._open: OrderedDict[str, Comparison] = OrderedDict()
        self._pairs_made = 0
        self._guard = threading.Lock()  # the open pairs and the counters
        self._generating = threading.Lock()  # one generation at a time: the CPU is the limit

    @property
    def mode(self) -> str:
        if len(self.writers) == 2:
            return f"{self.writers[0].label} vs {self.writers[1].label}"
        return f"two samples of {self.writers[0].description}"

    # ----- pairs

    def comparison(self, annotator: str, typed_prompt: str | None = None) -> Comparison:
        """The pair to show `annotator`: for a typed prompt, a new pair; else an open pair
        they have not voted on that has room for them, or a new one from the prompt set."""
        annotator = self._annotator(annotator, required=False)
        if typed_prompt is not None:
            prompt = [{"role": "user", "content": self._typed(typed_prompt)}]
            return self._new_pair(prompt, typed_by=annotator)
        with self._guard:
            for pair in self._open.values():
                room = annotator in pair.served or len(pair.served) < self.votes_per_pair
                if pair.typed_by is None and annotator not in pair.voted and room:
                    pair.served.add(annotator)
                    return pair
            if not self.prompts:
                raise LabelError(
                    400, "There is no prompt set: type a prompt in the box and press Ask both."
                )
            prompt = self.prompts[self._pairs_made % len(self.prompts)]
        return self._new_pair(prompt, typed_by=None, served=annotator)

    def _typed(self, text: str) -> str:
        if not text.strip():
            raise LabelError(400, "The prompt is empty: type a question or an instruction.")
        if len(text) > self.validation.max_chars:
            raise LabelError(400, _too_long("The prompt", len(text), self.validation.max_chars))
        row = {"prompt": [{"role": "user", "content": text}], "chosen": "a", "rejected": "b"}
        notes = quarantine_reasons(row, "preference", self.validation)
        if notes:
            raise LabelError(400, f"The prompt cannot be used: {next(iter(notes.values()))}.")
        return text

    def _new_pair(self, prompt: Messages, typed_by: str | None, served: str = "") -> Comparison:
        with self._guard:
            number = self._pairs_made
            self._pairs_made += 1
        seeds = (
            derived_seed(self.seed, "label-a", number),
            derived_seed(self.seed, "label-b", number),
        )
        first, second = self.writers[0], self.writers[-1]
        with self._generating:
            answers = [
                self._answer(writer, prompt, seed)
                for writer, seed in zip((first, second), seeds, strict=True)
            ]
        if random.Random(derived_seed(self.seed, "label-sides", number)).random() < 0.5:
            first, second = second, first
            answers.reverse()
            seeds = seeds[::-1]
        pair = Comparison(uuid.uuid4().hex, prompt, answers[0], answers[1], first, second, seeds)
        pair.typed_by = typed_by
        pair.served.add(typed_by if typed_by is not None else served)
        with self._guard:
            self._open[pair.id] = pair
            while len(self._open) > OPEN_PAIRS:
                self._open.popitem(last=False)
        return pair

    def _answer(self, writer: Writer, prompt: Messages, seed: int) -> str:
        chat_model = writer.chat_model
        prompt_ids = render_prompt(chat_model.tokenizer, prompt)
        budget = context_budget(chat_model.context_length, self.sampling.max_new_tokens)
        if budget is not None and len(prompt_ids) > budget:
            raise LabelError(
                400,
                f"The prompt takes {len(prompt_ids)} tokens, more than the {budget} the model "
                "reads before its answer: shorten it (or start rlhf label with a lower "
                "--max-new-tokens).",
            )
        reply = stream_reply(
            chat_model.model, chat_model.tokenizer, prompt_ids, self.sampling, seed, lambda _: None
        )
        return reply.text

    # ----- votes

    def vote(self, comparison_id: str, verdict: str, annotator: str, better: str | None) -> dict:
        """Record one vote durably; what the page shows after it."""
        if verdict not in VERDICTS:
            raise LabelError(400, "Pick one of: A is better, B is better, Tie, Both bad.")
        annotator = self._annotator(annotator, required=self.annotator_required)
        if better is not None:
            self._check_better(better)
        with self._guard:
            pair = self._open.get(comparison_id)
            if pair is None:
                raise LabelError(
                    404, "This pair is no longer open (the server was restarted): load a new one."
                )
            if annotator in pair.voted:
                raise LabelError(409, "You already voted on this pair: load the next one.")
            pair.voted.add(annotator)
        record = self._record(
            pair, verdict, annotator, better if better and better.strip() else None
        )
        try:
            appended = self.journal.append(record)
        except BaseException:
            with self._guard:
                pair.voted.discard(annotator)
            raise
        return {
            "saved": True,
            "seq": appended.seq,
            "rows": len(record["rows"]),
            "batch": appended.batch.name if appended.batch else None,
            "model_a": _revealed(pair.writer_a),
            "model_b": _revealed(pair.writer_b),
        }

    def _check_better(self, better: str) -> None:
        """Refuse a written answer that validation would quarantine for its own text."""
        if len(better) > self.validation.max_chars:
            raise LabelError(
                400, _too_long("The better answer", len(better), self.validation.max_chars)
            )
        row = {"prompt": [{"role": "user", "content": "-"}], "chosen": better, "rejected": "-"}
        reasons = quarantine_reasons(row, "preference", self.validation)
        if better.strip() and "invalid_text" in reasons:
            detail = reasons["invalid_text"].replace("'chosen' contains", "it contains")
            raise LabelError(400, f"The better answer cannot be saved: {detail}.")

    def _record(self, pair: Comparison, verdict: str, annotator: str, better: str | None) -> dict:
        record: dict[str, Any] = {
            "vote_id": uuid.uuid4().hex,
            "comparison_id": pair.id,
            "created_at": utc_now(),
            "annotator": annotator,
            "verdict": verdict,
            "prompt": pair.prompt,
            "answer_a": pair.answer_a,
            "answer_b": pair.answer_b,
            "model_a": pair.writer_a.label,
            "model_b": pair.writer_b.label,
            "model_a_description": pair.writer_a.description,
            "model_b_description": pair.writer_b.description,
            # The runs that trained each side: the gate matches votes to its candidate by them.
            "model_a_run_id": pair.writer_a.chat_model.run_id,
            "model_b_run_id": pair.writer_b.chat_model.run_id,
            "better_answer": better,
            "sampling": {**asdict(self.sampling), "seed_a": pair.seeds[0], "seed_b": pair.seeds[1]},
        }
        record["rows"] = preference_rows(record, self.validation)
        return record

    def _annotator(self, annotator: str, required: bool) -> str:
        annotator = (annotator or "").strip()
        if required and not annotator:
            raise LabelError(400, "Enter your annotator id at the top of the page before voting.")
        if len(annotator) > MAX_ANNOTATOR_CHARS or not annotator.isprintable():
            raise LabelError(
                400,
                f"The annotator id must be at most {MAX_ANNOTATOR_CHARS} printable characters.",
            )
        return annotator

    # ----- the tally

    def tally(self) -> dict:
        """Votes so far, the second model's head-to-head over the first (the candidate's
        over the champion by default; none for two samples of one model), and agreement."""
        votes = self.journal.votes()
        versus = None
        if len(self.writers) == 2:  # the second model's win rate over the first
            incumbent, challenger = (writer.label for writer in self.writers)
            versus = _with_counted(head_to_head(votes, challenger, incumbent))
        return {
            "votes": len(votes),
            "verdicts": verdict_counts(votes),
            "rows": sum(len(vote.get("rows", [])) for vote in votes),
            "pending": self.journal.pending(),
            "head_to_head": versus,
            "agreement": asdict(annotator_agreement(votes)),
        }


def _with_counted(result: Any) -> dict:
    return {**asdict(result), "counted": result.counted}


def _revealed(writer: Writer) -> str:
    if writer.label == writer.description:
        return writer.label
    return f"{writer.label} ({writer.description})"


def _too_long(what: str, length: int, limit: int) -> str:
    return (
        f"{what} has {length:,} characters; a preference row holds at most {limit:,} "
        "(data.validation.max_chars in params.yaml): shorten it."
    )
