import pytest
from kfp import dsl

from components.merge.component import merge


def test_a_folder_without_an_adapter_fails_in_one_line(artifact, tmp_path) -> None:
    model = artifact(dsl.Model, "model", base_model="x")
    (tmp_path / "model").mkdir()
    merged = artifact(dsl.Model, "merged_model")
    with pytest.raises(SystemExit, match=r"^error: .*model"):
        merge.python_func(model=model, merged_model=merged)
    assert not (tmp_path / "merged_model").exists() and merged.metadata == {}
