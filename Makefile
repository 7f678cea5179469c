# The README's two set-up commands:  `make repro` (main job) and `make test` (tests).
# Each installs whatever is missing first (a virtualenv in .venv with the pinned torch triple).
VENV ?= .venv
PYTHON ?= python3
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)

.PHONY: install repro repro-check repro-tolerance compare-all imemnet-scale test data lint bench plots-template mutation clean-venv

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

# The embedded corpus: generated only when data/ is absent. `dvc commit` puts it in the local cache (a
# fresh clone has none); a generated corpus whose hash differs from the one pinned in git shows up as a
# change to data.dvc and stops here.
data: install
	@if [ ! -d data ]; then \
	  echo "data/ is absent: generating the embedded corpus (imem synth)"; \
	  imem synth --quiet && dvc commit --force --quiet data.dvc && \
	  if ! git diff --quiet -- data.dvc 2>/dev/null; then \
	    echo "error: the generated corpus does not match the data.dvc in git (changed 'synth' params? then commit the updated data.dvc)" >&2; \
	    exit 1; \
	  fi; \
	fi

repro: data
	dvc repro
	@imem summary

# The reproducibility contract (README "Reproducibility"): after `make repro`, the data stages equal git's
# copies byte for byte and every metric lies within reproducibility.yaml's tolerance of the committed value.
repro-check: install
	imem repro check

# Measure how far trained metrics move on a simulated other CPU (AVX2 kernels, one thread), in a clone under
# $(TOLERANCE_WORK) (the whole default pipeline on one thread: about an hour on 2 cores); docs/reproducibility.md
# has the latest figures.
TOLERANCE_WORK ?= /tmp/imem-perturbed
repro-tolerance: install
	rm -rf $(TOLERANCE_WORK)-avx2-1thread
	imem repro perturb $(TOLERANCE_WORK)-avx2-1thread --setting avx2-1thread --json $(TOLERANCE_WORK)-avx2-1thread.json

# The full comparison set (compare/dvc.yaml): adds L3-Net, the thesis CNN and CDCML's ablation rows.
compare-all: data
	dvc repro compare/dvc.yaml
	@cat reports/comparison_full/comparison.md

# The on-demand IMEMNet-scale run (issue 14): the embedded corpus at IMEMNet's counts (35,817 clips, 25,620
# images; ~10 GB) in $(IMEMNET_WORK), prepare -> features -> train (fc_only) -> evaluate for cnn and
# transformer_v2, timed per stage; writes reports/imemnet_scale/ (docs/benchmarks.md).
IMEMNET_WORK ?= /tmp/imem-imemnet
imemnet-scale: install
	python benchmarks/imemnet_scale.py --work $(IMEMNET_WORK) --force

test: install
	python -m pytest

lint: install
	ruff check imem stages tests benchmarks

bench: install
	python benchmarks/bench_pairs.py

# The offline page template of `dvc plots show` (.dvc/plots/offline.html, committed): vega, vega-lite and vega-embed
# from the npm registry at the versions imem/dvc_plots.py pins, inlined. Needs npm; only after changing a version.
plots-template: install
	rm -rf .plots-npm && mkdir -p .plots-npm
	cd .plots-npm && for pkg in $$($(BIN)/python -c "from imem.dvc_plots import PACKAGES; print(*(f'{n}@{v}' for n, v in PACKAGES.items()))"); do \
	  name=$${pkg%@*}; npm pack --silent "$$pkg" >/dev/null && mkdir -p "$$name" && tar xzf "$$name-$${pkg#*@}.tgz" -C "$$name" --strip-components=1; \
	done
	python -m imem.dvc_plots .plots-npm
	rm -rf .plots-npm

# Mutation testing of the modules whose formulas the results rest on (issue 21; on demand, not in CI):
# mutmut mutates them ([tool.mutmut] in pyproject.toml) and runs the fast tests that reach each mutant;
# then the per-module score, with docs/testing.md's equivalent mutants set aside. MUTANTS narrows the run
# (mutmut name globs, e.g. MUTANTS='imem.metrics* imem.losses*'); results are cached in mutants/ between
# runs (delete it to start over). Runtimes on 2 cores: docs/testing.md.
MUTANTS ?=
mutation: install
	$(BIN)/python -m pip install --quiet -e ".[dev,mutation]"
	mutmut run $(MUTANTS) > mutants.log 2>&1 || (tail -c 2000 mutants.log; exit 1)
	@tail -c 300 mutants.log | tr '\r' '\n' | tail -n 2
	python benchmarks/mutation_summary.py

clean-venv:
	rm -rf $(VENV)
