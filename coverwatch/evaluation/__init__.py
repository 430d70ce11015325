"""Evaluation outside the daemon: the demo, the broadcast simulator and the scoring of a
daemon's events against a stream's ground truth. May import the runtime and the model side;
only the command line imports it."""
