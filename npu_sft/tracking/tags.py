"""The tags that tie MLflow runs and experiments to the pipeline and to Prefect."""

FLOW_RUN_TAG = "prefect_flow_run_id"  # which Prefect flow run an MLflow run belongs to
END_REASON_TAG = "npu_sft.end_reason"  # why a run did not finish: the flow run's final state and its message
# MLflow's UI opens an experiment by its kind: without one, MLflow 3 may open it as a GenAI experiment (an empty
# traces page) instead of the runs table and charts. "custom_model_development" is its "Machine learning" kind.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
