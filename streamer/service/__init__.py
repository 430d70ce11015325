"""The daemon around the pipeline: lifecycle, metrics, systemd notify, Kafka checkpoints."""
