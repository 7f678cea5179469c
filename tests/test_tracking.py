from pathlib import Path

from imem.tracking import flatten, repo_root, tracking_uri


def test_tracking_uri_defaults_to_sqlite_at_the_dvc_root(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri() == "http://127.0.0.1:5000"


def test_temporary_and_queued_experiments_log_to_the_main_root(monkeypatch, tmp_path):
    exp = tmp_path / "proj" / ".dvc" / "tmp" / "exps" / "tmpabc123"
    exp.mkdir(parents=True)
    monkeypatch.setenv("DVC_ROOT", str(exp))
    assert repo_root() == (tmp_path / "proj").resolve()


def test_repo_root_without_dvc_is_the_git_top_level(monkeypatch):
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.chdir(Path(__file__).parent)
    assert repo_root() == Path(__file__).resolve().parents[1]


def test_flatten_params():
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": "x"}) == {"a.b": 1, "a.c": "1,2", "d": "x"}


def test_params_come_from_the_stage_workspace_not_dvc_root(monkeypatch, tmp_path):
    """DVC points DVC_ROOT at the parent repo in --temp/queued experiments; the -S overrides live in the
    experiment's own workspace (the cwd)."""
    from imem.params import section

    (tmp_path / "parent").mkdir()
    (tmp_path / "parent" / "params.yaml").write_text("prepare:\n  seed: 1\n")
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "params.yaml").write_text("prepare:\n  seed: 2\n")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "parent"))
    monkeypatch.chdir(tmp_path / "exp")
    assert section("prepare")["seed"] == 2
