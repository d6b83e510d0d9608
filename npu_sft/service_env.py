"""Variables `make up` sets for the processes it starts, and the code in those processes reads (one module, no
heavy imports, so both sides can use the names)."""

PROJECT_DIR_VAR = "NPU_SFT_PROJECT_DIR"  # read by the deployments' pull step on the worker
# The MLflow server `make up` runs, and the store behind it: a flow whose store is that one writes through the
# server, so one process writes the SQLite file the UI reads.
MLFLOW_SERVER_VAR = "NPU_SFT_MLFLOW_SERVER"
MLFLOW_SERVER_STORE_VAR = "NPU_SFT_MLFLOW_SERVER_STORE"
