"""What a running round shows: `selflearn train`'s lines on stderr (a bar on a terminal, plain
lines elsewhere, nothing with --no-progress) and the progress file local mode reads."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys

import yaml

from selflearn.contracts import PhaseStarted, RoundProgress, StepDone
from selflearn.trainer.cli import ProgressFile
from selflearn.trainer.progress import RoundDisplay

PROGRESS_FIELDS = {"phase", "step", "of", "loss", "tokens_per_s", "eta_s", "started_at", "updated_at"}


class Terminal(io.StringIO):
    """What a terminal receives (a TTY, as tqdm and the display see it)."""

    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self, start: float = 1000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now


def a_training_round(display: RoundDisplay, clock: Clock) -> None:
    """Loading, 20 training steps of a second each, a preference phase of 2 steps, evaluation."""
    display(PhaseStarted("loading"))
    clock.now += 5
    display(PhaseStarted("training"))
    for step in range(1, 21):
        clock.now += 1
        display(StepDone(step, 20, round(3.0 - step * 0.1, 4), lr=1e-4, tokens_per_s=250.0 + step,
                         eta_s=float(20 - step)))
    display(PhaseStarted("learning preferences"))
    for step in (1, 2):
        clock.now += 2
        display(StepDone(step, 2, 0.69, kind="preference", eta_s=float(2 * (2 - step))))
    clock.now += 1
    display(PhaseStarted("evaluating the candidate"))
    display.close()


def test_plain_lines_a_phase_each_and_a_tenth_of_the_steps_each():
    out, clock = io.StringIO(), Clock()
    a_training_round(RoundDisplay(out, clock=clock), clock)
    lines = out.getvalue().splitlines()
    assert lines[:3] == ["[0:00] loading", "[0:05] training",
                         "[0:06] training: step 1/20 (5%), loss 2.900, 251 tok/s, ETA 0:19"]
    steps = [line for line in lines if line.startswith("[") and "] training: step" in line]
    # About one line per 10% of the steps: 1, 2, 4, ..., 20.
    assert [int(re.search(r"step (\d+)/", s).group(1)) for s in steps] == [1, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20]
    assert steps[-1] == "[0:25] training: step 20/20 (100%), loss 1.000, 270 tok/s, ETA 0:00"
    # The preference phase measures no tokens/s: it is left out, not shown as 0 or None.
    assert lines[-4:] == ["[0:25] learning preferences",
                          "[0:27] learning preferences: step 1/2 (50%), loss 0.690, ETA 0:02",
                          "[0:29] learning preferences: step 2/2 (100%), loss 0.690, ETA 0:00",
                          "[0:30] evaluating the candidate"]
    assert "\r" not in out.getvalue() and "|" not in out.getvalue(), "no bar in a log file"


def test_a_terminal_gets_a_bar_per_training_phase_with_steps_tokens_eta_and_loss():
    out, clock = Terminal(), Clock()
    a_training_round(RoundDisplay(out, clock=clock), clock)
    text = out.getvalue()
    # What stays on the screen: each line as the terminal shows it once carriage returns redrew it.
    screen = [line.rsplit("\r", 1)[-1].rstrip() for line in text.split("\n") if line.rsplit("\r", 1)[-1].strip()]
    assert screen[:2] == ["[0:00] loading", "[0:05] training"]
    bar = screen[2]
    assert bar.startswith("training: 100%|") and "| 20/20 [" in bar, bar
    assert bar.endswith(", loss 1.000, 270 tok/s, ETA 0:00]"), bar
    assert screen[3] == "[0:25] learning preferences"
    assert screen[4].startswith("learning preferences: 100%|") and "| 2/2 [" in screen[4], screen[4]
    assert screen[4].endswith(", loss 0.690, ETA 0:00]") and "tok/s" not in screen[4]
    assert screen[5:] == ["[0:30] evaluating the candidate"]
    # Redrawn at each step, in place.
    assert re.search(r"\rtraining:  50%\|[^|]+\| 10/20 \[\d\d:\d\d, loss 2\.000, 260 tok/s, ETA 0:10\]\r", text)
    assert "step 1/20" not in text, "a terminal gets the bar, not the plain lines"


def test_the_display_shows_progress_documents_as_local_mode_reads_them():
    """Local mode polls its trainer's progress file: the same document twice shows nothing new."""
    out = io.StringIO()
    display = RoundDisplay(out)
    doc = RoundProgress(phase="training", started_at=100.0, updated_at=172.0, step=9, of=18, loss=1.9,
                        tokens_per_s=265, eta_s=52)
    for d in (doc, doc, doc.model_copy(update={"step": 10, "updated_at": 176.0}),
              doc.model_copy(update={"step": 11, "eta_s": 41.0, "updated_at": 179.0}),
              doc.model_copy(update={"step": 18, "eta_s": 0.0, "updated_at": 201.0})):
        display.show(d)
    display.close()
    assert out.getvalue().splitlines() == [
        "[1:12] training",
        "[1:12] training: step 9/18 (50%), loss 1.900, 265 tok/s, ETA 0:52",
        # step 10 is still in the same tenth of the phase as step 9: no line
        "[1:19] training: step 11/18 (61%), loss 1.900, 265 tok/s, ETA 0:41",
        "[1:41] training: step 18/18 (100%), loss 1.900, 265 tok/s, ETA 0:00"]


def test_the_progress_file_holds_each_document_local_mode_reads(tmp_path):
    path = tmp_path / "run" / "progress.json"
    pf = ProgressFile(path)
    docs = [json.loads(path.read_text())]
    for event in (PhaseStarted("training"), StepDone(2, 9, 2.0, lr=1e-4, tokens_per_s=250.0, eta_s=30.0),
                  PhaseStarted("evaluating the candidate")):
        pf(event)
        docs.append(json.loads(path.read_text()))
    started = docs[0]["started_at"]
    assert docs[0] == {"phase": "starting", "started_at": started}
    assert docs[1] == {"phase": "training", "started_at": started, "updated_at": docs[1]["updated_at"]}
    assert docs[2] == {"phase": "training", "step": 2, "of": 9, "loss": 2.0, "tokens_per_s": 250.0, "eta_s": 30.0,
                       "started_at": started, "updated_at": docs[2]["updated_at"]}
    # A new phase has taken no step yet: the last phase's step and ETA are not shown as its own.
    assert docs[3] == {"phase": "evaluating the candidate", "started_at": started, "updated_at": docs[3]["updated_at"]}
    assert started <= docs[1]["updated_at"] <= docs[2]["updated_at"] <= docs[3]["updated_at"]
    assert all(set(d) <= PROGRESS_FIELDS for d in docs)
    assert [p.name for p in path.parent.iterdir()] == ["progress.json"], "replaced atomically, no temp file left"


def test_selflearn_train_shows_the_round_and_keeps_its_progress_file(tmp_path, tiny_llama_dir):
    """A real round through the command; its stderr is a pipe, so it gets plain lines (test_trainer.py's
    `test_cli_refuses_bad_runs_before_training` checks that --no-progress shows none)."""
    spec = {"baseModel": tiny_llama_dir, "storage": {"uri": f"file://{tmp_path}/store"},
            "sources": [{"snapshot": {"language": "en", "articlesPerRound": 3}}],
            "training": {"maxLength": 64, "batchSize": 2, "gradientAccumulation": 1, "learningRate": 2.0e-4,
                         "chatEval": False, "format": "text", "evalArticles": 1, "generalArticles": 2,
                         "epochs": 2}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"name": "p", "spec": spec}))

    proc = subprocess.run([sys.executable, "-m", "selflearn.trainer", "--run-config", str(tmp_path / "run.yaml"),
                           "--round", "1", "--progress-file", str(tmp_path / "progress.json")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["status"] == "published", "stdout stays the one result line"
    shown = [line for line in proc.stderr.splitlines() if re.match(r"\[\d+:\d\d\] ", line)]
    phases = [line.split("] ", 1)[1] for line in shown if ": step " not in line]
    # "exporting": the checkpoint's OpenVINO IR for serving (the run's serving.engine is auto).
    assert phases == ["loading", "evaluating the parent", "training", "evaluating the candidate", "exporting",
                      "publishing"]
    steps = [line for line in shown if "] training: step " in line]
    total = int(re.search(r"step 1/(\d+) ", steps[0]).group(1))
    assert total >= 4 and steps[-1].split("] ", 1)[1].startswith(f"training: step {total}/{total} (100%), loss ")
    assert len(steps) <= 11 and all(" tok/s, ETA " in s for s in steps)
    doc = json.loads((tmp_path / "progress.json").read_text())
    assert doc["phase"] == "publishing" and set(doc) == {"phase", "started_at", "updated_at"}
