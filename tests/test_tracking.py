"""semray.tracking: the one params logger (value policy, batching, resumed runs) on a real SQLite store."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from semray.tracking import MAX_PARAM_CHARS, log_params, param_value


@given(st.text(max_size=3 * MAX_PARAM_CHARS))
def test_param_value_fits_mlflow_and_marks_a_cut(text: str) -> None:
    v = param_value(text)
    assert len(v) <= MAX_PARAM_CHARS
    if len(text) <= MAX_PARAM_CHARS:
        assert v == text
    else:
        assert v.endswith("...") and text.startswith(v[:-3]) and len(v) == MAX_PARAM_CHARS


def test_param_value_of_plain_values() -> None:
    assert [param_value(x) for x in (None, 5, 0.25, True, "a")] == ["None", "5", "0.25", "True", "a"]


def test_log_params_batches_and_records_changed_values_on_resume(mlflow_store: str) -> None:
    import mlflow

    from semray.tracking import configure

    configure()
    params = {f"k{i:03d}": i for i in range(250)}  # more than one log_batch request (100 each)
    params["long"] = "x" * (MAX_PARAM_CHARS + 10)
    with mlflow.start_run() as run:
        log_params(params)  # the active run
    rid = run.info.run_id
    client = mlflow.MlflowClient()
    got = client.get_run(rid).data.params
    assert len(got) == 251 and got["k007"] == "7" and got["long"] == "x" * (MAX_PARAM_CHARS - 3) + "..."

    log_params({"k007": 8, "k008": 8, "new": None}, rid, client, resumed=True)
    data = client.get_run(rid).data
    assert data.params["k007"] == "7" and data.params["new"] == "None"  # params are never changed
    assert data.tags["resumed.k007"] == "8" and "resumed.k008" not in data.tags  # only changed values


def test_log_params_without_a_run_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="no active MLflow run"):
        log_params({"a": 1})
