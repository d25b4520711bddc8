"""The run lifecycle and its status document (pure logic)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from airflow_wmltrain.errors import ManifestError
from airflow_wmltrain.hooks.docker import ContainerOutcome
from airflow_wmltrain.lifecycle import RunState, RunStatus, TransitionError
from airflow_wmltrain.runtime.run import read_metrics
from airflow_wmltrain.training_id import check_training_id, derive_training_id, new_training_id


def test_states_move_forward_and_terminal_states_are_final() -> None:
    status = RunStatus("training-x").advance(RunState.DOWNLOADING).advance(RunState.PROCESSING)
    assert status.state is RunState.PROCESSING
    with pytest.raises(TransitionError, match="only move forward"):
        status.advance(RunState.DOWNLOADING)
    done = status.advance(RunState.STORING).advance(RunState.COMPLETED)
    for state in RunState:
        if state is not RunState.COMPLETED:
            with pytest.raises(TransitionError, match="COMPLETED"):
                done.advance(state)


def test_skipping_is_allowed_and_reentering_applies_changes() -> None:
    status = RunStatus("training-x").advance(RunState.DOWNLOADING).advance(RunState.STORING)
    again = status.advance(RunState.STORING, exit_code=3)
    assert again.exit_code == 3
    assert len(again.history) == 2


def test_a_failure_carries_its_code_and_message_and_round_trips() -> None:
    status = (
        RunStatus("training-x", name="n", gpus=("1",))
        .advance(RunState.DOWNLOADING)
        .advance(RunState.STORING)
        .fail(RunState.FAILED, "C201", "exited with status 3", exit_code=3)
    )
    document = json.loads(json.dumps(status.to_dict()))
    assert document["state"] == "FAILED"
    assert document["error"] == {
        "code": "C201",
        "message": "exited with status 3",
    }
    back = RunStatus.from_dict(document)
    assert back.state is RunState.FAILED
    assert back.error == status.error
    assert back.gpus == ("1",)
    assert back.entered(RunState.DOWNLOADING) == status.entered(RunState.DOWNLOADING)
    with pytest.raises(ValueError, match="not a failure state"):
        status.fail(RunState.COMPLETED, "C201", "x")


def test_a_document_that_is_not_a_status_is_refused() -> None:
    with pytest.raises(ValueError, match="not a training-run status document"):
        RunStatus.from_dict({"history": [{"state": "NOPE", "at": "x"}], "training_id": "t"})


@given(st.lists(st.sampled_from(list(RunState)), max_size=12))
def test_any_sequence_of_transitions_keeps_the_history_ordered(states: list[RunState]) -> None:
    status = RunStatus("training-x")
    for state in states:
        try:
            status = status.advance(state)
        except TransitionError:
            continue
    ranks = [t.state.rank for t in status.history]
    assert ranks == sorted(ranks)
    assert sum(t.state.terminal for t in status.history) <= 1


def test_container_outcomes_say_what_ended_the_process() -> None:
    def outcome(**state: object) -> ContainerOutcome:
        return ContainerOutcome.from_inspect({"State": {"Status": "exited", **state}})

    assert outcome(ExitCode=0).succeeded
    assert "exited with status 3" in outcome(ExitCode=3).failure(["a", "boom"])
    assert "boom" in outcome(ExitCode=3).failure(["a", "boom"])
    oom = outcome(ExitCode=137, OOMKilled=True)
    assert not oom.succeeded
    assert "out of memory (mem_limit 1g)" in oom.failure([], mem_limit="1g")
    assert "killed by signal 9" in outcome(ExitCode=137).failure([])
    assert ContainerOutcome.from_inspect({"State": {"Status": "running"}}).running


def test_metrics_keep_small_scalar_documents_only(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"accuracy": 0.9, "curve": [1, 2], "name": "x"}))
    assert read_metrics(path) == {"accuracy": 0.9, "name": "x"}
    path.write_text("[1, 2]")
    assert read_metrics(path) == {}
    path.write_text("{not json")
    assert read_metrics(path) == {}
    assert read_metrics(tmp_path / "missing.json") == {}


def test_training_ids() -> None:
    assert check_training_id(new_training_id()).startswith("training-")
    assert derive_training_id("d", "r", "t") == derive_training_id("d", "r", "t", -1)
    for bad in ("training-", "model-abc", "training-a/b", "training-" + "x" * 65):
        with pytest.raises(ManifestError, match="training_id"):
            check_training_id(bad)
