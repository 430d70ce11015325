"""Audio in: a file played as a stream, a microphone, Kafka topics of audio chunks."""
