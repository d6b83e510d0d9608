# make demo   set up both environments, then run the whole pipeline on the embedded tiny model (CPU)
# make test   set up both environments, then run the test suite
# make up     start the Prefect server, a worker and the MLflow UI on 127.0.0.1, and deploy every flow
# make down   stop exactly what `make up` started
.PHONY: setup demo test bench up down

setup:
	scripts/setup-envs

demo: setup
	.venv/bin/npu-sft demo

test: setup
	.venv/bin/python -m pytest -q

bench: setup
	.venv/bin/python benchmarks/bench_train_overhead.py
	.venv/bin/python benchmarks/bench_eval_overhead.py
	.venv/bin/python benchmarks/bench_serve.py

up: setup
	scripts/up

down:
	scripts/down
