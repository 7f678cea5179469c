import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests import corpus_fixtures

# Disk: a full run writes several GB of corpora, feature stores, checkpoints and MLflow stores into pytest's
# temporary directories, and CI's disk also holds the pipeline's outputs, DVC's cache and the virtualenv.
# pyproject.toml sets tmp_path_retention_policy = "failed" (each test's tmp_path goes when the test passes);
# module-scoped fixtures' tmp_path_factory.mktemp() directories would stay until the session ends, so they go
# when their module finishes without a failure. A failed module keeps them for inspection.
_FAILED_MODULES: set[str] = set()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        _FAILED_MODULES.add(item.module.__name__)
    return report


@pytest.fixture(scope="module", autouse=True)
def _remove_module_temp_dirs(request, tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    before = {p.name for p in base.iterdir()}
    yield
    if request.module.__name__ in _FAILED_MODULES:
        return
    for p in base.iterdir():
        # mktemp(name) makes numbered directories (name0, name1, ...); getbasetemp() / "name" (a cache that
        # later modules reuse, e.g. test_predict's tiny pipeline) has no number and stays
        if p.name not in before and p.is_dir() and p.name[-1].isdigit():
            shutil.rmtree(p, ignore_errors=True)
