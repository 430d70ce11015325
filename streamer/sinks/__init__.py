"""Where match events go: stdout, a JSON-lines file, a Kafka topic."""
